"""hf backend capture vs its bare forward, side by side on one GPU
(docs/BENCHMARKS.md, "Teacher capture").

A GPT-OSS-20B-shaped teacher (random bf16 weights: speed does not depend on
values; `--layers` of the 24 to fit one card with room for activations) runs:
  bare     the transformers forward with the lm_head on the last position only
           (what a prefill does), in the same token-budget batches;
  capture  the product's hf backend + writer pipeline: top-64 + log-sum-exp at
           T=1,2 + two fp8 hidden layers, written to shards of --rows-per-shard
           rows (one backend run over all of them, as cache-teacher does;
           pipeline_busy_last: seconds per stage, close_s finalising shards).
Compare useful FLOP rates: the capture also runs the lm_head on every position.

    python bench/hf_capture_bench.py [--layers 8] [--rows 32] [--seq-len 4096] [--rows-per-shard 8]
"""

from __future__ import annotations

import argparse
import atexit
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

from bench.gpt_oss_shape import flop_per_token, gpt_oss_config  # noqa: E402
from common.spec import HiddenSpec, ShardSpec, TargetSpec  # noqa: E402
from teacher_cache.backend import BackendOptions, SourceRow  # noqa: E402
from teacher_cache.hf_backend import HFBackend, token_budget_batches  # noqa: E402
from teacher_cache.pipeline import PipelineConfig, ProgressView, WriterPipeline  # noqa: E402
from teacher_cache.plan import plan_shards  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--max-tokens-per-batch", type=int, default=16384)
    ap.add_argument("--attn", default="flex_attention")
    ap.add_argument("--encode-threads", type=int, default=8)
    ap.add_argument("--rows-per-shard", type=int, default=8)
    args = ap.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    work = Path(tempfile.mkdtemp(prefix="hf_capture_"))
    atexit.register(shutil.rmtree, work, True)  # the synthetic cache is hundreds of MB
    (work / "teacher").mkdir()
    config_dict = gpt_oss_config(args.layers, mxfp4=False)
    vocab, width = config_dict["vocab_size"], config_dict["hidden_size"]
    (work / "teacher" / "config.json").write_text(json.dumps(config_dict))
    config = AutoConfig.from_pretrained(str(work / "teacher"))
    config._attn_implementation = args.attn
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    rng = np.random.default_rng(0)
    rows = [SourceRow(row_id=i, input_ids=rng.integers(0, vocab, args.seq_len).astype(np.int32),
                      labels=np.zeros(args.seq_len, np.int32)) for i in range(args.rows)]
    tokens = args.rows * args.seq_len

    @torch.no_grad()
    def bare():
        for batch in token_budget_batches(rows, args.max_tokens_per_batch):
            ids = torch.as_tensor(np.stack([r.input_ids for r in batch]), dtype=torch.long, device="cuda")
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()

    spec = ShardSpec(vocab_size=vocab, targets=TargetSpec(mode="topk", k=64, temperatures=(1.0, 2.0)),
                     hidden=HiddenSpec(layers=(args.layers // 2, args.layers), dtype="fp8", hidden_size=width))
    options = BackendOptions(model=str(work / "teacher"), device="cuda", dtype="bf16",
                             max_tokens_per_batch=args.max_tokens_per_batch, rows_per_shard=args.rows_per_shard)
    backend = HFBackend(spec, options, model=model)

    def capture(out: Path):
        out.mkdir(parents=True, exist_ok=True)
        progress = ProgressView(len(rows), enabled=False)
        pipeline = WriterPipeline(out, spec, PipelineConfig(encode_threads=args.encode_threads), progress)
        try:
            # As cache-teacher does: one backend run over every shard's rows.
            entries = pipeline.write_shards(plan_shards(len(rows), args.rows_per_shard), backend.run(rows))
        finally:
            pipeline.close()
        capture.busy = dict(pipeline.busy)  # backend_s, encode_s, write_s, close_s
        return entries

    # Warm-up both paths (flex attention compiles per shape), then time each twice, interleaved.
    bare()
    capture(work / "warm")
    times = {"bare": [], "capture": []}
    entries = []
    for rep in range(2):
        start = time.perf_counter()
        bare()
        times["bare"].append(time.perf_counter() - start)
        start = time.perf_counter()
        entries = capture(work / f"cache{rep}")
        times["capture"].append(time.perf_counter() - start)
    bare_tps = tokens / min(times["bare"])
    capture_tps = tokens / min(times["capture"])
    bare_flops, capture_flops = flop_per_token(config_dict)
    result = {
        "gpu": torch.cuda.get_device_name(0), "layers": args.layers, "rows": args.rows, "seq_len": args.seq_len,
        "attn": args.attn, "bare_tokens_per_s": bare_tps, "capture_tokens_per_s": capture_tps,
        "bare_tflops": bare_tps * bare_flops / 1e12, "capture_tflops": capture_tps * capture_flops / 1e12,
        "flop_rate_ratio": (capture_tps * capture_flops) / (bare_tps * bare_flops),
        "capture_bytes_per_token": sum(e.bytes for e in entries) / sum(e.tokens for e in entries), "times": times,
        "shards": len(entries), "rows_per_shard": args.rows_per_shard,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "pipeline_busy_last": capture.busy,
    }
    print(json.dumps(result, indent=1))
    print(f"| hf, GPT-OSS-20B shape, {args.layers} layers, {args.rows} x {args.seq_len} | bare {bare_tps:,.0f} tok/s "
          f"({result['bare_tflops']:.0f} TFLOP/s) | capture {capture_tps:,.0f} tok/s ({result['capture_tflops']:.0f} "
          f"TFLOP/s) | FLOP-rate ratio {result['flop_rate_ratio']:.3f} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "hf_capture_bench.json").write_text(json.dumps(result, indent=1))
    backend.close()


if __name__ == "__main__":
    main()
