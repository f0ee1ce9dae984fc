"""Student training throughput at the production shape: tokens/s per GPU, useful
TFLOP/s, peak memory, loader-fed vs synthetic batches, a per-category GPU-time
profile, and settings side by side in one run (docs/BENCHMARKS.md, "Student at
production shape").

The student has GPT-OSS-20B geometry (24 layers by default, hidden 2880, 64/8
heads of 64, 32 experts top-4, sliding window 128 on alternate layers,
vocabulary 201,088), phase-1 freezing (attention and router train; experts,
embeddings, lm_head and norms frozen), built by the product directly on each
GPU. A synthetic teacher cache (top-64 + log-sum-exp at T=1,2 + two fp8 hidden
layers) is written with the product's shard writer and the product's Trainer
runs the steps. Each variant is `name:key=value,key=value` over the config
(compile, activation_checkpointing, frozen_weights, ...), built fresh:

    python bench/train_bench.py --variants "plain:compile=false,activation_checkpointing=true;fast:" --profile
    python bench/train_bench.py --nproc 2 --variants "shard:frozen_weights=shard;replicate:"
    python bench/train_bench.py --dense-head --variants "tail:;dense:loss.kl_mode=dense"
    python bench/train_bench.py --device cpu --layers 2 --tiny   # a smoke run of this script
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import gc
import subprocess
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpt_oss_shape import gpt_oss_config  # noqa: E402
from common.causal_lm import IGNORE_INDEX  # noqa: E402
from common.cache_dir import CacheDir  # noqa: E402
from common.manifest import CacheManifest  # noqa: E402
from common.parent_death import die_with_parent, dies_with_this_process  # noqa: E402
from common.shard_format import TeacherRow  # noqa: E402
from common.shard_writer import ShardWriter  # noqa: E402
from common.spec import HiddenSpec, ShardSpec, TargetSpec, hidden_positions  # noqa: E402
from common.teacher_head import locate_teacher_head  # noqa: E402
from common.targets.topk import TopkRowTargets  # noqa: E402

K = 64


def synthetic_row(row_id: int, length: int, spec: ShardSpec, rng: np.random.Generator) -> TeacherRow:
    """Peaked top-64 targets with distinct ascending ids, exact-looking lse, fp8-able hidden states."""
    vocab, width = spec.vocab_size, spec.hidden.hidden_size
    positions = length - 1
    gaps = rng.integers(1, 2 * vocab // K - 1, size=(positions, K))
    ids_PK = np.minimum(np.cumsum(gaps, axis=1), vocab - 1)
    ids_PK = np.maximum.accumulate(ids_PK + np.arange(K), axis=1) % vocab
    ids_PK = np.sort(ids_PK, axis=1)
    logits_PK = (rng.standard_normal((positions, K)) * 2.5).astype(np.float32)
    top = np.log(np.exp(logits_PK).sum(1))
    lse_PT = np.stack([top + 0.3, np.log(np.exp(logits_PK / 2).sum(1)) + 1.0], axis=1).astype(np.float32)
    input_ids = rng.integers(0, vocab, size=length).astype(np.int32)
    labels = input_ids.copy()
    labels[: length // 8] = IGNORE_INDEX
    keep = hidden_positions(row_id, length, spec.hidden.token_fraction, spec.hidden.seed)
    hidden = {layer: torch.from_numpy(rng.standard_normal((len(keep), width)).astype(np.float32))
              for layer in spec.hidden.layers}
    return TeacherRow(row_id=row_id, input_ids_L=input_ids, labels_L=labels,
                      targets=TopkRowTargets(ids_PK=ids_PK, logits_PK=logits_PK, lse_PT=lse_PT),
                      hidden=hidden, hidden_positions_H=keep)


def write_teacher_head(out: Path, vocab: int, width: int) -> Path:
    """A random teacher final norm and lm_head (bf16 safetensors + config.json), for `kl_mode: dense`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {"model.norm.weight": (1.0 + 0.1 * torch.randn(width, generator=gen)).to(torch.bfloat16),
               "lm_head.weight": (torch.randn(vocab, width, generator=gen) * width ** -0.5).to(torch.bfloat16)}
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                                                 "vocab_size": vocab, "hidden_size": width}))
    return out


def write_cache(out: Path, rows: int, seq_len: int, hidden_layers: tuple[int, ...], vocab: int = 201_088,
                width: int = 2880, head_dir: Path | None = None) -> ShardSpec:
    """A synthetic top-64 cache with fp8 hidden layers (default: the GPT-OSS-20B vocabulary and width);
    with `head_dir`, a random teacher head there and its record in the manifest (dense targets from
    the last cached layer)."""
    spec = ShardSpec(vocab_size=vocab, targets=TargetSpec(mode="topk", k=K, temperatures=(1.0, 2.0)),
                     hidden=HiddenSpec(layers=hidden_layers, dtype="fp8", token_fraction=1.0, hidden_size=width))
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    writer = ShardWriter(out, 0, spec, 0, rows)
    for r in range(rows):
        writer.add(synthetic_row(r, seq_len, spec, rng))
    writer.close()
    dense_head = None
    if head_dir is not None:
        dense_head = locate_teacher_head(write_teacher_head(head_dir, vocab, width), hidden_layers[-1], vocab, width)
    CacheDir(out).refresh_manifest(CacheManifest(spec=spec, teacher={"model": "synthetic"},
                                                 work={"rows_per_shard": rows}, dense_head=dense_head))
    return spec


# Kernel-name categories of the profile (first match wins); CPU runs classify aten op names.
CATEGORIES = (
    ("communication", ("nccl", "all_gather", "reduce_scatter", "allreduce", "c10d")),
    ("attention", ("flash", "fmha", "flex", "attention", "sdpa", "_efficient_attention")),
    ("experts (grouped GEMM)", ("grouped", "group_gemm", "_grouped_mm", "bmm")),
    ("GEMM (projections, router, lm_head)", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "aten::mm",
                                             "aten::addmm", "aten::linear")),
    ("optimizer", ("adam", "multi_tensor", "_foreach")),
    ("elementwise, reductions, copies", ("triton", "elementwise", "vectorized", "reduce", "copy", "memcpy", "memset",
                                         "fill", "cat", "index", "scatter", "gather", "softmax", "norm", "aten::")),
)
RANGES = ("vpmoe.backbone", "vpmoe.fused_loss", "vpmoe.hidden_cosine", "vpmoe.backward", "vpmoe.grad_clip",
          "vpmoe.optimizer")


def parse_variants(text: str) -> list[tuple[str, list[str]]]:
    """"name:key=value,key=value;name2:" -> [(name, ["key=value", ...]), ...] (top-level config keys or section.key)."""
    variants = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, _, sets = item.partition(":")
        variants.append((name.strip(), [s.strip() for s in sets.split(",") if s.strip()]))
    return variants


def classify(name: str) -> str:
    lowered = name.lower()
    for category, needles in CATEGORIES:
        if any(needle in lowered for needle in needles):
            return category
    return "other"


def profile_breakdown(prof, step_seconds: float, steps: int, on_gpu: bool) -> dict:
    """GPU time per category (ms per step), the product's annotated ranges, and the host gap."""
    from torch.autograd import DeviceType

    per_category: dict[str, float] = {}
    per_kernel: dict[str, float] = {}
    busy_us = 0.0
    if on_gpu:
        seen = set()
        for evt in prof.events():
            key = (evt.name, evt.time_range.start, evt.device_index)
            # The product's ranges show up on the device timeline too (as annotations spanning their
            # kernels): count kernels only, or the busy time would include them twice.
            if evt.device_type == DeviceType.CUDA and key not in seen and evt.name not in RANGES:
                seen.add(key)
                us = evt.time_range.elapsed_us()
                busy_us += us
                per_category[classify(evt.name)] = per_category.get(classify(evt.name), 0.0) + us
                per_kernel[evt.name] = per_kernel.get(evt.name, 0.0) + us
    else:
        for avg in prof.key_averages():
            if avg.key.startswith("aten::") or "nccl" in avg.key or "gloo" in avg.key:
                us = avg.self_cpu_time_total
                busy_us += us
                per_category[classify(avg.key)] = per_category.get(classify(avg.key), 0.0) + us
    ranges = {}
    for avg in prof.key_averages():
        if avg.key in RANGES:
            device_us = getattr(avg, "device_time_total", 0.0) or getattr(avg, "cuda_time_total", 0.0)
            ranges[avg.key] = {"cpu_ms": avg.cpu_time_total / 1e3 / steps, "gpu_ms": device_us / 1e3 / steps}
    step_ms = step_seconds * 1e3 / steps
    return {"step_ms": step_ms, "busy_ms": busy_us / 1e3 / steps,
            "host_gap_ms": max(step_ms - busy_us / 1e3 / steps, 0.0),
            "categories_ms": {k: v / 1e3 / steps for k, v in sorted(per_category.items(), key=lambda kv: -kv[1])},
            "ranges": ranges,
            "top_kernels_ms": {name[:90]: us / 1e3 / steps
                               for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:15]}}


def common_overrides(args, cache: Path, student: Path, ckpt: Path, teacher_layers) -> list[str]:
    steps = args.warmup_steps + args.steps + (2 if args.profile else 0)
    return [
        f"student.init_config={student}", "student.path=null", f"student.dtype={args.dtype}",
        "student.compute_dtype=bf16", f"student.attn_implementation={args.attn}",
        f"data.train_cache={cache}", f"data.seq_len={args.seq_len}", f"data.micro_batch={args.micro_batch}",
        "data.global_batch=0", f"data.grad_accum={args.accum}", "data.decode_processes=0", "data.prefetch=8",
        "loss.ce=0.2", "loss.kl=0.2", "loss.kl_temperature=2.0", "loss.hidden_cosine=0.6",
        f"loss.layer_pairs=[[{teacher_layers[0]},{teacher_layers[0]}],[{teacher_layers[1]},{teacher_layers[1]}]]",
        f"optim.steps={4 * steps}", "eval.every=0", f"checkpoint.dir={ckpt}", "checkpoint.every=0",
        "export.enabled=false", "log.every=1000", f"device={args.device}",
    ] + ([f"student.experts_implementation={args.experts}"] if args.experts else [])


def run_variant(name: str, base: list[str], sets: list[str], args, on_gpu: bool) -> dict:
    from student_train.config import load_config
    from student_train.loader import CacheLoader
    from student_train.metrics import mfu, peak_memory_gib
    from student_train.trainer import Trainer

    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    cfg = load_config(ROOT / "configs" / "phase1_gptoss20b_smoke.yaml", base + sets)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    build_s = time.perf_counter() - t0

    def timed_steps(next_micro_batches, steps):
        # Warm-up: compilation, allocator and autotuning, and a loader's pinned-memory pool growing
        # to its steady size (prefetch plus in-flight micro batches).
        for _ in range(args.warmup_steps):
            trainer._train_step(next_micro_batches())
        sync()
        start, tokens = time.perf_counter(), 0
        for _ in range(steps):
            mbs = next_micro_batches()
            tokens += sum(mb.num_tokens for mb in mbs)
            trainer._train_step(mbs)
        sync()
        return tokens / (time.perf_counter() - start)

    try:
        batches = iter(trainer.train_loader)
        fixed = [next(batches) for _ in range(args.accum)]
        trainer.train_loader.close()
        t0 = time.perf_counter()
        trainer._train_step(fixed)  # the first step: compilation and autotuning
        sync()
        first_step_s = time.perf_counter() - t0
        synthetic_tps = timed_steps(lambda: fixed, args.steps)
        result = {"variant": name, "overrides": sets,
                  "build_s": build_s, "first_step_s": first_step_s, "tokens_per_s_per_gpu": synthetic_tps,
                  "useful_tflops_per_gpu": synthetic_tps * trainer.flops.per_token / 1e12,
                  "mfu": mfu(synthetic_tps, trainer.flops, trainer.env.device),
                  "flop_per_token": trainer.flops.per_token, "trained_params": trainer.param_counts.trained,
                  "frozen_params": trainer.param_counts.frozen}
        if args.loader and name == args.loader_variant:
            fed = {}
            for spec in args.loader.split(","):
                # threads:N or processes:N, and ":nocheck" to skip the row checksums (their cost, side by side)
                kind, count, *flags = spec.split(":")
                assert kind in ("threads", "processes") and set(flags) <= {"nocheck"}, spec
                config = dataclasses.replace(trainer.train_loader.config, num_threads=int(count),
                                             decode_processes=int(count) if kind == "processes" else 0,
                                             verify_checksums="nocheck" not in flags)
                with CacheLoader(config, rank=trainer.env.rank, world_size=trainer.env.world_size) as loader:
                    it = iter(loader)
                    fed[spec] = timed_steps(lambda: [next(it) for _ in range(args.accum)], args.steps)
            first = next(iter(fed))
            result.update(loader=first, loader_tokens_per_s_per_gpu=fed[first],
                          loader_over_synthetic=fed[first] / synthetic_tps,
                          loaders_over_synthetic={k: v / synthetic_tps for k, v in fed.items()})
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
            sync()
            with profile(activities=activities) as prof:
                start = time.perf_counter()
                for _ in range(2):
                    trainer._train_step(fixed)
                sync()
                seconds = time.perf_counter() - start
            result["profile"] = profile_breakdown(prof, seconds, 2, on_gpu)
        result["peak_mem_gib"] = peak_memory_gib(trainer.env.device)
        return result
    finally:
        trainer.close()
        trainer = None  # the model's GPU memory goes before the next variant is built
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()


def print_tables(results: list[dict], world_size: int) -> None:
    for r in results:
        if "error" in r:
            print(f"variant {r['variant']} failed: {r['error']}")
    results = [r for r in results if "error" not in r]
    if not results:
        return
    base = results[0]["tokens_per_s_per_gpu"]
    print(f"\n| variant | GPUs | tok/s per GPU | vs {results[0]['variant']} | useful TFLOP/s per GPU | MFU | "
          "peak GiB | first step s | loader-fed / synthetic |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        fed = f"{r['loader_over_synthetic']:.3f}" if "loader_over_synthetic" in r else "-"
        mfu_text = "-" if r["mfu"] is None else f"{r['mfu']:.3f}"
        print(f"| {r['variant']} ({', '.join(r['overrides']) or 'config as shipped'}) | {world_size} | "
              f"{r['tokens_per_s_per_gpu']:,.0f} | {r['tokens_per_s_per_gpu'] / base:.3f} | "
              f"{r['useful_tflops_per_gpu']:.0f} | {mfu_text} | {r['peak_mem_gib']:.1f} | {r['first_step_s']:.1f} | "
              f"{fed} |")
    for r in results:
        for spec, ratio in r.get("loaders_over_synthetic", {}).items():
            print(f"loader-fed / synthetic, {r['variant']}, {spec}: {ratio:.3f}")
    for r in results:
        if "profile" not in r:
            continue
        prof = r["profile"]
        print(f"\nprofile of {r['variant']}: step {prof['step_ms']:.1f} ms, device busy {prof['busy_ms']:.1f} ms, "
              f"host gap {prof['host_gap_ms']:.1f} ms")
        print("| category | ms per step | share of busy |\n|---|---|---|")
        for category, ms in prof["categories_ms"].items():
            print(f"| {category} | {ms:.1f} | {ms / max(prof['busy_ms'], 1e-9):.3f} |")
        print("| range (forward ones on the device; backward kernels run on autograd's thread) | CPU ms | device ms |")
        for key, value in prof["ranges"].items():
            print(f"| {key} | {value['cpu_ms']:.1f} | {value['gpu_ms']:.1f} |")
        print("| kernel | ms per step | category |")
        for name, ms in prof["top_kernels_ms"].items():
            print(f"| {name} | {ms:.1f} | {classify(name)} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer miniature (CPU smoke run of this script)")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--attn", default="flex_attention")
    ap.add_argument("--experts", default=None, help="transformers experts_implementation, e.g. grouped_mm")
    ap.add_argument("--dtype", default="fp32", help="student.dtype (trained weights and optimizer state)")
    ap.add_argument("--variants", default="shipped:",
                    help='"name:key=value,...;name2:..." config overrides per variant, the first is the baseline')
    ap.add_argument("--loader", default="threads:6",
                    help="loader-fed passes, comma-separated: threads:N or processes:N, ':nocheck' skips row "
                         "checksums; '' for none")
    ap.add_argument("--loader-variant", default=None, help="the variant the loader-fed pass runs (default: last)")
    ap.add_argument("--profile", action="store_true", help="a profiled pass per variant: GPU time by category")
    ap.add_argument("--dense-head", action="store_true",
                    help="a random teacher head with the cache, so variants may set loss.kl_mode=dense")
    ap.add_argument("--nproc", type=int, default=1, help="ranks on this node (FSDP2 over NCCL; gloo on CPU)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (figures come from the GPU)")
    args = ap.parse_args()
    on_gpu = args.device == "cuda"
    variants = parse_variants(args.variants)
    args.loader_variant = args.loader_variant or variants[-1][0]
    layers = 2 if args.tiny else args.layers
    teacher_layers = (max(layers // 2, 1), layers)

    work = Path(args.work) if args.work else None
    launched = "RANK" in os.environ
    if work is None:
        work = Path(tempfile.mkdtemp(prefix="train_bench_"))
        atexit.register(shutil.rmtree, work, True)  # the synthetic cache is GBs at 4096 tokens x 201k vocab
    config = gpt_oss_config(layers, mxfp4=False, tiny=args.tiny)
    cache, student, ckpt = work / "cache", work / "student", work / "ckpt"
    cache_s = None
    if not launched and not (cache / "manifest.json").is_file():
        t0 = time.perf_counter()
        write_cache(cache, args.rows, args.seq_len, teacher_layers, config["vocab_size"], config["hidden_size"],
                    head_dir=work / "teacher-head" if args.dense_head else None)
        cache_s = time.perf_counter() - t0
        student.mkdir(parents=True, exist_ok=True)
        (student / "config.json").write_text(json.dumps(config))
    if args.nproc > 1 and not launched:
        # The ranks get this script's arguments without --nproc (torch.distributed.run would take it
        # for its own --nproc-per-node) and with the cache written above.
        argv, skip = [], False
        for arg in sys.argv[1:]:
            if skip or arg.startswith("--nproc"):
                skip = arg == "--nproc"
                continue
            argv.append(arg)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               str(Path(__file__).resolve()), *argv, "--work", str(work)]
        # The agent dies with this process and each rank with the agent (below), as `vpmoe train`'s do.
        raise SystemExit(subprocess.call(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                         preexec_fn=dies_with_this_process()))
    if launched:
        die_with_parent()

    base = common_overrides(args, cache, student, ckpt, teacher_layers)
    results = []
    for name, sets in variants:
        if args.nproc > 1:  # a rank that fails alone would leave the others waiting in a collective
            results.append(run_variant(name, base, sets, args, on_gpu))
            continue
        try:
            results.append(run_variant(name, base, sets, args, on_gpu))
        except Exception as exc:  # one variant's failure should not cost the others' figures
            traceback.print_exc()
            results.append({"variant": name, "overrides": sets, "error": f"{type(exc).__name__}: {exc}"})
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if rank == 0:
        summary = {"layers": layers, "seq_len": args.seq_len, "micro_batch": args.micro_batch, "accum": args.accum,
                   "attn": args.attn, "world_size": world_size, "cache_write_s": cache_s,
                   "gpu": torch.cuda.get_device_name(0) if on_gpu else "cpu", "results": results}
        print(json.dumps(summary, indent=1))
        print_tables(results, world_size)
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1))
    from student_train import parallel

    parallel.shutdown()


if __name__ == "__main__":
    main()
