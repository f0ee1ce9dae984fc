"""`vpmoe autotune`: the largest micro batch that fits, by real probes.

Each probe runs what a training step runs on one micro batch of synthetic
inputs shaped like the cache's (seq_len tokens, the cache's top-k width or
sampled ids, the configured teacher hidden layers): forward with the fused
loss, backward, gradient clipping and an optimizer step, so optimizer state
is part of the measured memory. An out-of-memory error marks the size as not
fitting (agreed over ranks), and so does a peak that leaves less than the
headroom (default 5% of the GPU's memory) free: a size that barely fits a
synthetic step can fail hours later on fragmentation or an eval batch. Sizes double until one fails, then a binary
search finds the boundary. On CPU nothing runs out of memory in useful time,
so the search stops at a cap and says so.

With `recompute="measure"` (the command's default) the search runs with
activation checkpointing off and on, times a few steps at each setting's
largest micro batch, and keeps the setting with more tokens/s: recompute buys
memory with about a third more compute, which pays only where it lets a much
larger micro batch fit.
"""

from __future__ import annotations

import copy
import gc
import time
from dataclasses import dataclass, field

import torch

from common.causal_lm import decoder_layers
from common.manifest import load_manifest
from common.spec import HiddenSpec, ShardSpec
from common.targets import target_kind
from student_train import parallel
from student_train.batch import StudentBatch
from student_train.config import TrainConfig
from student_train.losses import get_divergence
from student_train.optim import build_optimizer
from student_train.parallel import DistEnv, all_reduce_min, print0

CPU_CAP = 4
GPU_CAP = 256
DEFAULT_HEADROOM = 0.05  # of the GPU's memory, left free at a probe's peak


@dataclass
class Probe:
    micro_batch: int
    fits: bool
    seconds: float
    peak_mem_gib: float | None
    why: str = ""  # why it does not fit: "out of memory" or "headroom"


def _peak_and_total(device: torch.device) -> tuple[int, int] | None:
    """(peak allocated bytes since the last reset, the device's total bytes) on a GPU; None elsewhere."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device), torch.cuda.get_device_properties(device).total_memory


@dataclass
class GbsPlan:
    target_gbs: int
    micro_batch: int  # 0 when the target cannot be met at this world size
    grad_accum: int
    note: str = ""


@dataclass
class RecomputeCandidate:
    activation_checkpointing: bool
    max_micro_batch: int
    tokens_per_s: float  # per rank, timed at max_micro_batch (0 when nothing fits)
    peak_mem_gib: float | None


@dataclass
class AutotuneResult:
    seq_len: int
    world_size: int
    device: str
    max_micro_batch: int  # largest that fit (0: not even 1)
    cap: int
    capped: bool  # the search stopped at the cap, not at a failure
    probes: list[Probe] = field(default_factory=list)
    plans: list[GbsPlan] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    activation_checkpointing: bool = False  # the setting the result is for (chosen when measured)
    candidates: list[RecomputeCandidate] = field(default_factory=list)  # one per setting measured


def plan_accumulation(target_gbs: int, max_micro_batch: int, world_size: int) -> GbsPlan:
    """Largest micro batch <= max that splits target_gbs evenly over ranks and accumulation steps."""
    if target_gbs < 1:
        raise ValueError(f"--target-gbs must be >= 1, got {target_gbs}")
    if max_micro_batch < 1:
        return GbsPlan(target_gbs, 0, 0, "micro batch 1 does not fit")
    if target_gbs % world_size:
        return GbsPlan(target_gbs, 0, 0, f"not a multiple of the world size {world_size}")
    per_rank = target_gbs // world_size
    micro = max(m for m in range(1, min(max_micro_batch, per_rank) + 1) if per_rank % m == 0)
    largest = min(max_micro_batch, per_rank)
    note = "" if micro == largest else f"{largest} fits but does not divide {per_rank} sequences per rank"
    return GbsPlan(target_gbs, micro, per_rank // micro, note)


def cache_spec_or_default(cfg: TrainConfig, vocab: int, student_width: int) -> tuple[ShardSpec, str | None]:
    """The train cache's spec, or a stand-in shaped like the config when the cache is not there."""
    try:
        return load_manifest(cfg.data.train_cache).spec, None
    except (ValueError, OSError):
        loss = cfg.loss
        layers = loss.to_loss_config().teacher_layers
        # the kind of cache the configured divergence reads
        kind = target_kind(get_divergence(loss.kl_mode).targets.cache_mode)
        targets = kind.stand_in_spec(loss.kl_temperature)
        spec = ShardSpec(vocab_size=vocab, targets=targets,
                         hidden=HiddenSpec(layers=layers, hidden_size=student_width if layers else 0))
        return spec, (f"{cfg.data.train_cache}: no cache manifest; probing with {kind.describe(targets)}"
                      f"{' and teacher width = student width' if layers else ''}")


def synthetic_batch(spec: ShardSpec, micro_batch: int, seq_len: int, teacher_layers,
                    gen: torch.Generator) -> StudentBatch:
    """Every position valid and every target slot filled: the most memory a real batch can take."""
    B, L, P, V = micro_batch, seq_len, seq_len - 1, spec.vocab_size
    input_ids_BL = torch.randint(0, V, (B, L), generator=gen)
    batch = StudentBatch(row_ids_BR=torch.arange(B)[:, None], input_ids_BL=input_ids_BL,
                         attention_mask_BL=torch.ones(B, L, dtype=torch.int64), labels_BL=input_ids_BL.clone(),
                         num_tokens=B * L)
    batch.targets = spec.targets.kind.synthetic_batch_targets(spec, B, P, gen)
    for layer in teacher_layers:
        batch.teacher_hidden[layer] = torch.randn(B, L, spec.hidden.hidden_size, generator=gen)
    batch.hidden_mask_BL = torch.ones(B, L, dtype=torch.bool)
    return batch


RECOMPUTE_MODES = ("config", "measure")
TIMED_STEPS = 3


def autotune(cfg: TrainConfig, seq_len: int, target_gbs: list[int], max_micro_batch: int = 0,
             recompute: str = "config", headroom: float = DEFAULT_HEADROOM) -> AutotuneResult:
    """recompute: "config" searches with the config's activation_checkpointing; "measure" searches
    with it off and on and returns the setting with more tokens/s at its largest micro batch.
    headroom: the fraction of the GPU's memory a fitting size must leave free at its peak."""
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"--recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    if not 0 <= headroom < 1:
        raise ValueError(f"--headroom must be in [0, 1), got {headroom}")
    env: DistEnv = parallel.init_distributed(cfg.device)
    settings = [cfg.activation_checkpointing] if recompute == "config" else [False, True]
    results = []
    for checkpointing in settings:
        trial = copy.deepcopy(cfg)
        trial.activation_checkpointing = checkpointing
        results.append(_search(trial, env, seq_len, target_gbs, max_micro_batch, timed=recompute == "measure",
                               headroom=headroom))
        gc.collect()
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
    best = max(results, key=lambda r: (r.candidates[0].tokens_per_s, r.max_micro_batch))
    best.candidates = [r.candidates[0] for r in results]
    if len(results) > 1:
        speeds = ", ".join(f"recompute {'on' if c.activation_checkpointing else 'off'}: micro batch "
                           f"{c.max_micro_batch} at {c.tokens_per_s:,.0f} tokens/s per rank" for c in best.candidates)
        best.notes.append(f"measured {speeds}; chosen: activation_checkpointing "
                          f"{str(best.activation_checkpointing).lower()}")
    return best


def _search(cfg: TrainConfig, env: DistEnv, seq_len: int, target_gbs: list[int], max_micro_batch: int,
            timed: bool, headroom: float) -> AutotuneResult:
    from student_train.trainer import build_distill_model, build_student

    cfg = copy.deepcopy(cfg)
    cfg.data.seq_len = seq_len
    student, _ = build_student(cfg, env)
    vocab = student.get_output_embeddings().weight.shape[0]
    spec, note = cache_spec_or_default(cfg, vocab, student.config.hidden_size)
    loss_cfg = cfg.loss.to_loss_config()
    teacher_layers = loss_cfg.teacher_layers
    if len(decoder_layers(student)) < max((s for s, _ in loss_cfg.layer_pairs), default=0):
        raise ValueError("loss.layer_pairs names a student layer the student does not have")
    model, _ = build_distill_model(cfg, env, student, spec)
    optimizer = build_optimizer(model, cfg.optim, env.device)
    params = [p for p in model.parameters() if p.requires_grad]
    on_gpu = env.device.type == "cuda"
    cap = max_micro_batch or (GPU_CAP if on_gpu else CPU_CAP)
    result = AutotuneResult(seq_len=seq_len, world_size=env.world_size, device=str(env.device),
                            max_micro_batch=0, cap=cap, capped=False,
                            activation_checkpointing=cfg.activation_checkpointing)
    if note:
        result.notes.append(note)
    gen = torch.Generator().manual_seed(cfg.seed)

    def probe(m: int) -> bool:
        batch = synthetic_batch(spec, m, seq_len, teacher_layers, gen)
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(env.device)
        start = time.perf_counter()
        fits = True
        try:
            with parallel.autocast_context(env, cfg.student.compute_dtype):
                loss, _ = model(batch.to(env.device), float(m * (seq_len - 1) * env.world_size),
                                float(m * seq_len * env.world_size))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        except torch.OutOfMemoryError:
            fits = False
            # An OOM mid-forward can leave FSDP units gathered; put every unit back in its sharded state.
            for module in model.modules():
                if hasattr(module, "reshard") and hasattr(module, "unshard"):
                    module.reshard()
        finally:
            optimizer.zero_grad(set_to_none=True)
            loss = batch = None
            gc.collect()
            if on_gpu:
                torch.cuda.synchronize(env.device)
        memory = _peak_and_total(env.device)
        peak = memory[0] / 2**30 if memory else None
        within = memory is None or memory[0] <= (1 - headroom) * memory[1]
        # 2: fits, 1: ran but over the headroom, 0: out of memory; the worst rank decides
        state = int(all_reduce_min(torch.tensor([2 if fits and within else int(fits)], device=env.device)).item())
        why = ("out of memory", "headroom", "")[state]
        result.probes.append(Probe(m, state == 2, time.perf_counter() - start, peak, why))
        text = {2: "fits", 1: f"runs, but leaves less than {headroom:.0%} of the GPU free", 0: "out of memory"}[state]
        total = f" of {memory[1] / 2**30:.1f}" if memory else ""
        print0(f"micro batch {m}: {text}{f', peak {peak:.1f}{total} GiB' if peak is not None else ''}")
        return state == 2

    # Doubling until a size fails or passes the cap, then bisection between the last fit and that bound.
    good, bound = 0, None
    m = 1
    while m <= cap:
        if not probe(m):
            bound = m
            break
        good, m = m, m * 2
    failed = bound is not None
    bound = bound if failed else cap + 1
    while bound - good > 1:
        mid = (good + bound) // 2
        if probe(mid):
            good = mid
        else:
            bound, failed = mid, True
    result.capped = not failed and good == cap
    result.max_micro_batch = good
    over = [p for p in result.probes if p.why == "headroom"]
    if over:
        result.notes.append(f"micro batch {min(p.micro_batch for p in over)} ran but left less than "
                            f"{headroom:.0%} of the GPU's memory free; --headroom 0 accepts it")
    if result.capped:
        why = "on CPU memory is not the limit in useful time" if not on_gpu else "raise --max-micro-batch"
        result.notes.append(f"stopped at the cap of micro batch {cap} without running out of memory ({why})")
    result.plans = [plan_accumulation(g, good, env.world_size) for g in target_gbs]
    tokens_per_s, peak = 0.0, None
    if timed and good > 0:
        batch = synthetic_batch(spec, good, seq_len, teacher_layers, gen).to(env.device)
        num_valid, num_hidden = float(good * (seq_len - 1) * env.world_size), float(good * seq_len * env.world_size)

        def step():
            with parallel.autocast_context(env, cfg.student.compute_dtype):
                loss, _ = model(batch, num_valid, num_hidden)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up (and compilation when compile is on)
        if on_gpu:
            torch.cuda.synchronize(env.device)
            torch.cuda.reset_peak_memory_stats(env.device)
        start = time.perf_counter()
        for _ in range(TIMED_STEPS):
            step()
        if on_gpu:
            torch.cuda.synchronize(env.device)
            peak = torch.cuda.max_memory_allocated(env.device) / 2**30
        tokens_per_s = TIMED_STEPS * good * seq_len / (time.perf_counter() - start)
        # The slowest rank sets the pace.
        tokens_per_s = float(all_reduce_min(torch.tensor([tokens_per_s], device=env.device)).item())
        print0(f"activation_checkpointing {str(cfg.activation_checkpointing).lower()}: micro batch {good} at "
               f"{tokens_per_s:,.0f} tokens/s per rank")
    result.candidates = [RecomputeCandidate(cfg.activation_checkpointing, good, tokens_per_s, peak)]
    return result


def run(cfg: TrainConfig, seq_len: int, target_gbs: list[int], max_micro_batch: int = 0,
        recompute: str = "config", headroom: float = DEFAULT_HEADROOM) -> AutotuneResult:
    clean = False
    try:
        result = autotune(cfg, seq_len, target_gbs, max_micro_batch, recompute, headroom)
        clean = True
        return result
    finally:
        parallel.shutdown(clean)

