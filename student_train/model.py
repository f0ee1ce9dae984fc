"""The student: loading, choosing what trains, and the distillation wrapper.

`DistillModel.forward` runs the backbone, captures the selected decoder-layer
outputs with hooks, and computes the whole loss inside forward. Under FSDP2 the
wrapper is the root module, so the lm_head (a root parameter) is unsharded for
the whole forward and the fused, chunked lm_head + CE + KL can use it directly.

Shape suffixes: B rows, L tokens, P = L - 1 target positions (position t
describes token t + 1), N = B * P flattened positions, D student width,
E teacher width, K top-k width, T cached temperatures, M sampled ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.profiler import record_function

from common.causal_lm import TORCH_DTYPES, capture_block_outputs, decoder_layers
from common.manifest import CacheManifest
from common.model_files import safetensors_files
from common.row_columns import CHANNELS
from common.spec import ShardSpec
from common.teacher_head import TeacherHead, TeacherHeadRecord
from student_train.batch import StudentBatch
from student_train.config import StudentConfig
from student_train.eval_groups import group_ids_BP
from student_train.losses import (
    LossConfig,
    build_hidden_projection,
    distill_loss,
    get_divergence,
    hidden_cosine_loss,
    lse_column,
    position_weights_BP,
)
from student_train.losses.channel_weights import NEEDS_CHANNELS
from student_train.losses.dense_targets import DenseTargets
from student_train.packing import packed_inputs
from student_train.weights import load_safetensors_into, untied_missing

PROJECTIONS_FILE = "hidden_projections.safetensors"


# ---------------------------------------------------------------- loading


def load_student(cfg: StudentConfig, seed: int = 0, device: torch.device | str = "cpu") -> nn.Module:
    """HF causal LM from a directory, or randomly initialised (deterministic in `seed`) from a config,
    built directly on `device`.

    Every rank builds the same whole model on its own device: random weights come from the
    same seed, checkpoint weights from the same files, so the result does not depend on the
    number of ranks, and a 21B student starts in seconds (nothing passes through host memory).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    # Built in the frozen dtype when one is set (usually the checkpoint's), so no fp32 copy of the
    # frozen majority is ever made; `cast_trained` then upcasts what trains.
    kwargs = dict(dtype=TORCH_DTYPES[cfg.frozen_dtype or cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.experts_implementation:
        kwargs["experts_implementation"] = cfg.experts_implementation
    key, source = ("student.path", cfg.path) if cfg.path is not None else ("student.init_config", cfg.init_config)
    if not Path(source).exists():
        where = "does not exist" if key == "student.init_config" else "does not exist (a local model directory)"
        raise ValueError(f"{key} {source}: {where}")
    try:
        config = AutoConfig.from_pretrained(str(source), local_files_only=True,
                                            trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{key} {source}: not a model config ({str(exc).splitlines()[0]})") from exc
    # A clear error before anything is built.
    weight_files = safetensors_files(Path(cfg.path)) if cfg.path is not None else []
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    if weight_files:
        missing = untied_missing(model, load_safetensors_into(model, weight_files))
        if missing:
            raise ValueError(f"student.path {cfg.path}: {weight_files[0].name} and its siblings lack "
                             f"{len(missing)} of the model's tensors, e.g. {missing[:3]}")
    model.config.use_cache = False  # training never decodes; a KV cache only costs memory
    return model


@dataclass
class ParamCounts:
    trained: int
    frozen: int
    trained_tensors: int
    frozen_tensors: int

    def describe(self) -> str:
        total = self.trained + self.frozen
        return (f"parameters: {self.trained:,} trained ({self.trained_tensors} tensors), "
                f"{self.frozen:,} frozen ({self.frozen_tensors} tensors), "
                f"{100 * self.trained / max(total, 1):.1f}% trained")


def select_trainable(model: nn.Module, train: list[str], freeze: list[str]) -> ParamCounts:
    """requires_grad from name regexes (re.search): trained = matches `train` (all if empty) and not `freeze`.

    Must run before FSDP wraps the model: fully_shard groups parameters by their
    requires_grad and the optimizer is built from the trained ones only.
    """
    names = [name for name, _ in model.named_parameters()]
    patterns = {}
    for key, regexes in (("student.train", train), ("student.freeze", freeze)):
        for regex in regexes:
            try:
                compiled = re.compile(regex)
            except re.error as exc:
                raise ValueError(f"{key}: {regex!r} is not a valid regex ({exc})") from None
            if not any(compiled.search(n) for n in names):
                raise ValueError(f"{key}: regex {regex!r} matches no parameter of the student "
                                 f"(e.g. {names[0]!r}, {names[len(names) // 2]!r})")
            patterns.setdefault(key, []).append(compiled)
    train_re, freeze_re = patterns.get("student.train", []), patterns.get("student.freeze", [])
    counts = ParamCounts(0, 0, 0, 0)
    for name, param in model.named_parameters():
        trained = (not train_re or any(r.search(name) for r in train_re)) and not any(r.search(name) for r in freeze_re)
        param.requires_grad_(trained)
        if trained:
            counts.trained += param.numel()
            counts.trained_tensors += 1
        else:
            counts.frozen += param.numel()
            counts.frozen_tensors += 1
    if counts.trained == 0:
        raise ValueError("student.train / student.freeze leave no parameter to train")
    return counts


def cast_trained(model: nn.Module, dtype: str) -> None:
    """Trained parameters to `dtype` (frozen ones keep the dtype they were loaded in)."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != TORCH_DTYPES[dtype]:
            p.data = p.data.to(TORCH_DTYPES[dtype])


# ---------------------------------------------------------------- the wrapper


@dataclass(frozen=True)
class TargetLayout:
    """What the cache holds, as the loss needs it."""

    lse_index: int  # column of the cached log-sum-exps at the KL temperature (top-k; 0 when not cached)
    num_samples: int  # draws per position (sampled)
    teacher_hidden_size: int

    @classmethod
    def from_spec(cls, spec: ShardSpec, loss: LossConfig) -> "TargetLayout":
        # Whether a missing column is an error is the divergence's call (check_cache_fits).
        lse_index = lse_column(spec.targets.temperatures, loss.kl_temperature) or 0
        return cls(lse_index=lse_index, num_samples=spec.targets.num_samples,
                   teacher_hidden_size=spec.hidden.hidden_size)


@dataclass
class LossSums:
    """Detached sums over this rank's micro batch; divide after all-reducing."""

    ce_sum: torch.Tensor
    kl_sum: torch.Tensor
    top1_agree_sum: torch.Tensor
    valid_tokens: torch.Tensor
    hidden_dist_sum: torch.Tensor  # sum of (1 - cos) over layer pairs and positions
    hidden_positions: torch.Tensor  # positions x layer pairs
    # [G, 4] sums of ce, kl, top1 agreement and tokens per (source, channel) group
    # (student_train/eval_groups.py); None for a batch with neither
    group_sums_G4: torch.Tensor | None = None

    def as_tensor(self) -> torch.Tensor:
        return torch.stack([getattr(self, name) for name in self.FIELDS]).double()

    FIELDS = ("ce_sum", "kl_sum", "top1_agree_sum", "valid_tokens", "hidden_dist_sum", "hidden_positions")


class DistillModel(nn.Module):
    """Student + hidden projections; forward returns (globally normalised loss, LossSums)."""

    def __init__(self, student: nn.Module, loss: LossConfig, layout: TargetLayout,
                 dense_head: TeacherHead | None = None, dense_layer: int = 0):
        super().__init__()
        self.student = student
        self.loss_cfg = loss
        self.layout = layout
        # kl_mode dense: the teacher's frozen final norm and lm_head, replicated on every rank and
        # kept out of the module tree (no FSDP, no optimizer, no checkpoint), and its input layer.
        assert (dense_head is not None) == (loss.kl_mode == "dense"), "kl_mode dense needs the teacher head"
        self.dense_head, self.dense_layer = dense_head, dense_layer
        width = student.config.hidden_size
        # Projections train: they take the trained parameters' dtype.
        dtype = next((p.dtype for p in student.parameters() if p.requires_grad), next(student.parameters()).dtype)
        self.projections = nn.ModuleDict()
        for s, t in loss.hidden_pairs:
            proj = build_hidden_projection(width, layout.teacher_hidden_size)
            if proj is not None:
                self.projections[projection_key(s, t)] = proj.to(dtype)
        layers = decoder_layers(student)
        student_layers = sorted({s for s, _ in loss.hidden_pairs})
        for s in student_layers:
            if not 1 <= s <= len(layers):
                raise ValueError(f"loss.layer_pairs: student layer {s} outside 1..{len(layers)}")
        # Layer s (1-based) is the stream leaving decoder block s, as the teacher's is.
        self._captured: dict[int, torch.Tensor] = {}
        self._hooks = capture_block_outputs(layers, student_layers, self._captured)
        head = student.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ValueError("the student's lm_head has a bias; the fused loss supports a bias-free lm_head only")

    def forward(self, batch: StudentBatch, num_valid_global: float, num_hidden_global: float = 0.0,
                num_sources: int | None = None):
        """`num_sources`: the loader's source table's size, for sums per source and channel (eval);
        None (training): no per-group sums are computed."""
        self._captured.clear()
        backbone = self.student.get_decoder()
        with record_function("vpmoe.backbone"):  # ranges the profile of bench/train_bench.py reports
            if batch.position_ids_BL is None:
                inputs = dict(attention_mask=batch.attention_mask_BL)
            else:  # packed: restarting positions keep the rows apart (student_train/packing.py)
                inputs = packed_inputs(self.student, batch.position_ids_BL)
            hidden_BLD = backbone(input_ids=batch.input_ids_BL, use_cache=False, **inputs).last_hidden_state
        b, length, width = hidden_BLD.shape
        # Student position t predicts token t+1: drop the last position, shift labels left.
        hidden_ND = hidden_BLD[:, :-1].reshape(-1, width)
        labels_N = batch.target_labels_BP().reshape(-1)
        # Each teacher layer dequantized once, though the dense targets and the hidden cosine may
        # both read the last one.
        teacher_float: dict[int, torch.Tensor] = {}

        def teacher_hidden(layer: int) -> torch.Tensor:
            if layer not in teacher_float:
                teacher_float[layer] = batch.hidden_float(layer)
            return teacher_float[layer]

        targets = self._targets(batch, b * (length - 1), teacher_hidden)
        weight_VD = self.student.get_output_embeddings().weight
        cfg = self.loss_cfg
        if num_valid_global > 0:
            with record_function("vpmoe.fused_loss"):
                weights_BP = position_weights_BP(batch, cfg.channel_weights)  # None: all 1
                groups_BP, num_groups = group_ids_BP(batch, num_sources) if num_sources is not None else (None, 0)
                loss, m = distill_loss(hidden_ND, weight_VD, labels_N, targets, num_valid_global,
                                       weights_N=None if weights_BP is None else weights_BP.reshape(-1),
                                       groups_N=None if groups_BP is None else groups_BP.reshape(-1),
                                       num_groups=num_groups, **cfg.distill_kwargs())
        else:  # nothing to predict anywhere this step (e.g. a filler micro batch): keep the graph, add 0
            loss = hidden_ND.sum() * 0.0
            zero = loss.detach().float()
            m = dict(ce_sum=zero, kl_sum=zero, top1_agree_sum=zero, valid_tokens=zero)

        zero = loss.detach().new_zeros(())
        hidden_dist, hidden_positions = zero, zero
        if cfg.hidden_cosine_weight > 0 and num_hidden_global > 0:
            with record_function("vpmoe.hidden_cosine"):
                mask_N = batch.hidden_mask_BL.reshape(-1).bool()
                dist_sum = 0.0
                for s, t in cfg.layer_pairs:
                    student_ND = self._captured[s].reshape(b * length, -1)
                    teacher_NE = teacher_hidden(t).reshape(b * length, -1)
                    proj = self.projections[projection_key(s, t)] if projection_key(s, t) in self.projections else None
                    dist_sum = dist_sum + hidden_cosine_loss(student_ND, teacher_NE, mask_N, proj, 1.0)
                # Averaged over layer pairs and over every rank's and micro batch's hidden positions.
                loss = loss + cfg.hidden_cosine_weight * dist_sum / (num_hidden_global * len(cfg.layer_pairs))
                hidden_dist = dist_sum.detach().to(zero.dtype)
                hidden_positions = zero + mask_N.sum() * len(cfg.layer_pairs)
        self._captured.clear()
        sums = LossSums(ce_sum=m["ce_sum"].detach().float(), kl_sum=m["kl_sum"].detach().float(),
                        top1_agree_sum=m["top1_agree_sum"].detach().float(),
                        valid_tokens=m["valid_tokens"].detach().float(), hidden_dist_sum=hidden_dist.float(),
                        hidden_positions=hidden_positions.float(), group_sums_G4=m.get("group_sums_G4"))
        return loss, sums

    def _targets(self, batch: StudentBatch, n: int, teacher_hidden):
        if batch.targets is None:
            return None
        targets = batch.targets.loss_targets(n, self.layout)
        if self.dense_head is None:
            return targets
        # The stored state of token t is what the teacher's head turns into the distribution of
        # token t + 1: target position t (already shifted) reads hidden position t, the last one none.
        hidden_NE = teacher_hidden(self.dense_layer)[:, :-1].reshape(n, -1)
        has_hidden_N = batch.hidden_mask_BL[:, :-1].reshape(n)
        return DenseTargets(hidden_NE, has_hidden_N, self.dense_head, targets,
                            skip_missing=self.loss_cfg.dense_fallback == "skip")


def projection_key(student_layer: int, teacher_layer: int) -> str:
    return f"s{student_layer}_t{teacher_layer}"


# ---------------------------------------------------------------- cache vs config


def check_cache_fits(spec: ShardSpec, loss: LossConfig, student_vocab: int, num_student_layers: int,
                     where: str) -> None:
    """Everything about the cache that would fail mid-run, checked before training."""
    if spec.vocab_size != student_vocab:
        raise ValueError(f"{where}: cache vocabulary {spec.vocab_size} != student vocabulary {student_vocab}")
    get_divergence(loss.kl_mode).check_cache(spec.targets, loss, where)
    if not loss.channel_weights.uniform and CHANNELS not in spec.columns:
        raise ValueError(f"{where}: {NEEDS_CHANNELS}")
    if loss.hidden_cosine_weight > 0:
        stored = set(spec.hidden.layers)
        for s, t in loss.layer_pairs:
            if t not in stored:
                raise ValueError(f"{where}: loss.layer_pairs asks for teacher layer {t}, the cache stores "
                                 f"{sorted(stored) or 'no hidden layers'}")
            if not 1 <= s <= num_student_layers:
                raise ValueError(f"loss.layer_pairs: student layer {s} outside 1..{num_student_layers}")


def dense_head_record(manifest: CacheManifest, loss: LossConfig, where: str) -> TeacherHeadRecord | None:
    """kl_mode dense: the cache's record of the teacher head (None for other modes); ValueError
    naming the cache when it has none or lacks the layer the head reads."""
    if loss.kl_mode != "dense":
        return None
    record = manifest.dense_head
    if record is None:
        raise ValueError(f"{where}: loss.kl_mode 'dense' needs a cache written with cache-teacher "
                         "--dense-from-last-layer (its manifest has no dense_head)")
    if record.layer not in manifest.spec.hidden.layers:
        raise ValueError(f"{where}: dense_head reads teacher layer {record.layer}, the cache stores "
                         f"{list(manifest.spec.hidden.layers)}")
    return record
