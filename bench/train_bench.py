"""Student training throughput on one GPU: tokens/s, MFU, peak memory, and
loader-fed vs synthetic-batch steps (docs/BENCHMARKS.md, "Training").

The student has GPT-OSS-20B geometry (hidden 2880, 64/8 heads of 64, 32
experts top-4, vocabulary 201,088) with fewer layers so it fits one card;
phase-1 freezing (experts, embeddings, lm_head, norms frozen). A synthetic
teacher cache (top-64 + log-sum-exp at T=1,2 + two fp8 hidden layers) at 4096
tokens per row is written with the product's shard writer, and the product's
Trainer runs the steps:

    python bench/train_bench.py [--layers 2] [--rows 48] [--steps 6]
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpt_oss_shape import gpt_oss_config  # noqa: E402
from common.manifest import CacheManifest, refresh_manifest  # noqa: E402
from common.shard_format import TeacherRow  # noqa: E402
from common.shard_writer import ShardWriter  # noqa: E402
from common.spec import HiddenSpec, ShardSpec, TargetSpec, hidden_positions  # noqa: E402

VOCAB, WIDTH, K = 201_088, 2880, 64


def synthetic_row(row_id: int, length: int, spec: ShardSpec, rng: np.random.Generator) -> TeacherRow:
    """Peaked top-64 targets with distinct ascending ids, exact-looking lse, fp8-able hidden states."""
    positions = length - 1
    gaps = rng.integers(1, 2 * VOCAB // K - 1, size=(positions, K))
    ids_PK = np.minimum(np.cumsum(gaps, axis=1), VOCAB - 1)
    ids_PK = np.maximum.accumulate(ids_PK + np.arange(K), axis=1) % VOCAB
    ids_PK = np.sort(ids_PK, axis=1)
    logits_PK = (rng.standard_normal((positions, K)) * 2.5).astype(np.float32)
    top = np.log(np.exp(logits_PK).sum(1))
    lse_PT = np.stack([top + 0.3, np.log(np.exp(logits_PK / 2).sum(1)) + 1.0], axis=1).astype(np.float32)
    input_ids = rng.integers(0, VOCAB, size=length).astype(np.int32)
    labels = input_ids.copy()
    labels[: length // 8] = -100
    keep = hidden_positions(row_id, length, spec.hidden.token_fraction, spec.hidden.seed)
    hidden = {layer: torch.from_numpy(rng.standard_normal((len(keep), WIDTH)).astype(np.float32))
              for layer in spec.hidden.layers}
    return TeacherRow(row_id=row_id, input_ids_L=input_ids, labels_L=labels, topk_ids_PK=ids_PK,
                      topk_logits_PK=logits_PK, lse_PT=lse_PT, hidden=hidden, hidden_positions_H=keep)


def write_cache(out: Path, rows: int, seq_len: int, hidden_layers: tuple[int, ...]) -> ShardSpec:
    spec = ShardSpec(vocab_size=VOCAB, targets=TargetSpec(mode="topk", k=K, temperatures=(1.0, 2.0)),
                     hidden=HiddenSpec(layers=hidden_layers, dtype="fp8", token_fraction=1.0, hidden_size=WIDTH))
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    writer = ShardWriter(out, 0, spec, 0, rows)
    for r in range(rows):
        writer.add(synthetic_row(r, seq_len, spec, rng))
    writer.close()
    refresh_manifest(out, CacheManifest(spec=spec, teacher={"model": "synthetic"}, work={"rows_per_shard": rows}))
    return spec


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)  # the student is built on the CPU first: keep it small
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--attn", default="flex_attention")
    ap.add_argument("--experts", default=None, help="transformers experts_implementation, e.g. grouped_mm")
    ap.add_argument("--loaders", default="threads:6,processes:6,threads:2",
                    help="loader-fed passes: threads:N decodes in N threads, processes:N in N processes")
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (figures come from the GPU)")
    args = ap.parse_args()
    on_gpu = args.device == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    from student_train.config import load_config
    from student_train.loader import CacheLoader
    from student_train.metrics import mfu, peak_memory_gib
    from student_train.trainer import Trainer

    work = Path(tempfile.mkdtemp(prefix="train_bench_"))
    atexit.register(shutil.rmtree, work, True)  # the synthetic cache is hundreds of MB
    t0 = time.perf_counter()
    teacher_layers = (args.layers // 2, args.layers)
    write_cache(work / "cache", args.rows, args.seq_len, teacher_layers)
    cache_s = time.perf_counter() - t0
    (work / "student").mkdir()
    (work / "student" / "config.json").write_text(json.dumps(gpt_oss_config(args.layers, mxfp4=False)))
    overrides = [
        f"student.init_config={work / 'student'}", "student.path=null", "student.dtype=bf16",
        "student.compute_dtype=bf16", f"student.attn_implementation={args.attn}",
        f"data.train_cache={work / 'cache'}", f"data.seq_len={args.seq_len}",
        f"data.micro_batch={args.micro_batch}", "data.global_batch=0", f"data.grad_accum={args.accum}", "data.decode_processes=0",
        "data.prefetch=8", "loss.ce=0.2", "loss.kl=0.2", "loss.kl_temperature=2.0", "loss.hidden_cosine=0.6",
        f"loss.layer_pairs=[[{teacher_layers[0]},{teacher_layers[0]}],[{teacher_layers[1]},{teacher_layers[1]}]]",
        f"optim.steps={(1 + len(args.loaders.split(','))) * (args.warmup_steps + args.steps)}", "eval.every=0", f"checkpoint.dir={work / 'ckpt'}", "checkpoint.every=0",
        "export.enabled=false", "log.every=1000", f"device={args.device}",
    ]
    if args.experts:
        overrides.append(f"student.experts_implementation={args.experts}")
    cfg = load_config(ROOT / "configs" / "phase1_gptoss20b_smoke.yaml", overrides)
    trainer = Trainer(cfg)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()

    def timed_steps(next_micro_batches, steps):
        # Warm-up: allocator and autotuning, and a loader's pinned-memory pool growing to its
        # steady size (prefetch plus in-flight micro batches).
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

    batches = iter(trainer.train_loader)
    fixed = [next(batches) for _ in range(args.accum)]
    trainer.train_loader.close()
    synthetic_tps = timed_steps(lambda: fixed, args.steps)
    loaders = {}
    for spec in args.loaders.split(","):
        kind, count = spec.split(":")
        assert kind in ("threads", "processes"), spec
        config = dataclasses.replace(trainer.train_loader.config, num_threads=int(count),
                                     decode_processes=int(count) if kind == "processes" else 0)
        with CacheLoader(config, rank=trainer.env.rank, world_size=trainer.env.world_size) as loader:
            it = iter(loader)
            loaders[spec] = timed_steps(lambda: [next(it) for _ in range(args.accum)], args.steps)
    first = next(iter(loaders))
    loader_tps = loaders[first]
    result = {
        "layers": args.layers, "seq_len": args.seq_len, "micro_batch": args.micro_batch, "accum": args.accum,
        "attn": args.attn, "experts": args.experts, "trained_params": trainer.param_counts.trained,
        "frozen_params": trainer.param_counts.frozen, "synthetic_tokens_per_s": synthetic_tps,
        "loader": first, "loader_tokens_per_s": loader_tps, "loader_over_synthetic": loader_tps / synthetic_tps,
        "loaders_tokens_per_s": loaders, "loaders_over_synthetic": {k: v / synthetic_tps for k, v in loaders.items()},
        "steps": args.steps, "warmup_steps": args.warmup_steps,
        "mfu_synthetic": mfu(synthetic_tps, trainer.flops, trainer.env.device),
        "mfu_loader": mfu(loader_tps, trainer.flops, trainer.env.device),
        "peak_mem_gib": peak_memory_gib(trainer.env.device), "cache_write_s": cache_s,
        "gpu": torch.cuda.get_device_name(0) if on_gpu else "cpu",
    }
    print(json.dumps(result, indent=1))
    fed = " | ".join(f"loader {k.replace(':', ' x ')} {v:,.0f} tok/s (ratio {v / synthetic_tps:.3f})"
                     for k, v in loaders.items())
    print(f"| GPT-OSS-shaped student, {args.layers} layers, {args.seq_len} tokens x micro {args.micro_batch} x accum "
          f"{args.accum} | synthetic {synthetic_tps:,.0f} tok/s (MFU {_fmt(result['mfu_synthetic'])}) | {fed} | "
          f"peak {result['peak_mem_gib']:.1f} GiB |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"train_bench_{args.attn}.json").write_text(json.dumps(result, indent=1))
    trainer.close()


if __name__ == "__main__":
    main()
