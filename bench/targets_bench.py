"""Target selection on one chunk of teacher positions: the float32-copy route
vs the product's (top-k on the lm_head's bf16 output, log-sum-exps at every
temperature in one compiled float32 reduction), side by side on one GPU.

The lm_head matmul of the chunk is timed alone too, so the table shows what
the selection costs beyond the FLOPs it has to do. GPT-OSS-20B widths
(hidden 2880, vocabulary 201,088), top-64, T=1,2:

    python bench/targets_bench.py [--chunk 1024] [--repeats 20]

Prints a markdown table and writes $OUT/targets_bench.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.spec import TargetSpec  # noqa: E402
from teacher_cache import fused_selection, targets  # noqa: E402
from teacher_cache.targets import (DEFAULT_TOPK_BLOCK, SelectionConfig, _lse, block_max_topk,  # noqa: E402
                                    compute_targets)


def float32_route(hidden_nD, weight_VD, spec: TargetSpec):
    """What the selection did before: a float32 copy of the logits, then
    top-k and one logsumexp per temperature on it."""
    logits_nV = (hidden_nD @ weight_VD.T).float()
    vals, ids = logits_nV.topk(spec.k, dim=-1)
    lse = torch.stack([torch.logsumexp(logits_nV / t, dim=-1) for t in spec.temperatures], dim=-1)
    return ids, vals, lse


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / repeats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=2880)
    ap.add_argument("--vocab", type=int, default=201_088)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--blocks", default="32,64,128,256", help="block sizes for the block-max top-k rows")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark times CUDA kernels"
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden_nD = torch.randn(args.chunk, args.hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    weight_VD = torch.randn(args.vocab, args.hidden, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.05
    spec = TargetSpec(k=args.top_k, temperatures=(1.0, 2.0))
    logits_fn = lambda h: h @ weight_VD.T  # noqa: E731

    old = float32_route(hidden_nD, weight_VD, spec)
    new = compute_targets(hidden_nD, logits_fn, spec, chunk_size=args.chunk)
    # Same selection: ids may differ only where bf16 values tie, lse to float32 rounding.
    same_ids = (torch.sort(old[0], dim=-1).values == torch.sort(new.topk_ids_NK, dim=-1).values).float().mean().item()
    lse_err = (old[2] - new.lse_NT).abs().max().item()
    assert torch.equal(old[1], new.topk_logits_NK.sort(dim=-1, descending=True).values), "top-k values differ"
    assert lse_err < 1e-3, lse_err

    def unfused():
        return compute_targets(hidden_nD, logits_fn, spec, chunk_size=args.chunk, config=SelectionConfig(fused=False))

    fused = "fused lse + block maxima (Triton), " if fused_selection.available() else ""
    product = f"product: {fused}block-max top-k ({DEFAULT_TOPK_BLOCK})"
    rows = {"lm_head matmul only": timed(lambda: logits_fn(hidden_nD), args.repeats),
            "float32 copy + topk + logsumexp per T": timed(lambda: float32_route(hidden_nD, weight_VD, spec),
                                                           args.repeats),
            product: timed(lambda: compute_targets(hidden_nD, logits_fn, spec, chunk_size=args.chunk), args.repeats),
            f"separate passes: block-max top-k ({DEFAULT_TOPK_BLOCK}) + compiled lse": timed(unfused, args.repeats)}
    logits_nV = logits_fn(hidden_nD)
    rows["top-k alone, one pass"] = timed(lambda: logits_nV.topk(spec.k, dim=-1), args.repeats)
    for block in (int(b) for b in args.blocks.split(",")):
        vals = block_max_topk(logits_nV, spec.k, block)[0].sort(dim=-1, descending=True).values
        assert torch.equal(vals, logits_nV.topk(spec.k, dim=-1).values), block
        rows[f"top-k alone, block max over {block}"] = timed(lambda: block_max_topk(logits_nV, spec.k, block),
                                                             args.repeats)
    inv_temps = tuple(1.0 / t for t in spec.temperatures)
    rows["log-sum-exps alone (compiled)"] = timed(lambda: _lse(logits_nV, inv_temps), args.repeats)
    if fused_selection.available():
        rows["log-sum-exps + block maxima alone (fused, one read)"] = timed(
            lambda: fused_selection.lse_and_block_max(logits_nV, inv_temps, DEFAULT_TOPK_BLOCK), args.repeats)
    del logits_nV
    base = rows["lm_head matmul only"]
    lines = [f"| route ({args.chunk} positions, V={args.vocab:,}) | ms | ms beyond the matmul | positions/s |",
             "|---|---|---|---|"]
    for name, ms in rows.items():
        if "alone" in name:  # parts of the selection: no matmul in them
            lines.append(f"| {name} | {ms:.2f} | - | {args.chunk / ms * 1e3:,.0f} |")
            continue
        lines.append(f"| {name} | {ms:.2f} | {ms - base:.2f} | {args.chunk / ms * 1e3:,.0f} |")
    lines.append("")
    lines.append(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; fused kernel checked and in use: "
                 f"{targets._fused_state}; top-{args.top_k}, T=1,2; "
                 f"identical top-k values, same id sets {same_ids:.4f}, max lse difference {lse_err:.2e}")
    print("\n".join(lines), flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "targets_bench.json").write_text(json.dumps({"ms": rows, "args": vars(args),
                                                                    "table": lines}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
