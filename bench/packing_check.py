"""Packed rows against rows alone on a device, per attention implementation and dtype.

The CPU tests cover eager and SDPA attention in float64 (tests/test_packing.py); GPT-OSS's
sinks under flex attention run only on GPUs, so this prints the same comparison there: the
largest |packed - alone| of the logits (GPT-OSS geometry in miniature, alternating sliding
and full layers, rows longer than the sliding window), next to the gap with no boundary.

    python bench/packing_check.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo.tiny_models import build_model, tiny_gpt_oss_config  # noqa: E402
from student_train.packing import check_packed_attention, packed_inputs, packed_position_ids  # noqa: E402

VOCAB = 1000


@torch.no_grad()
def compare(attn: str, dtype: torch.dtype, device: str) -> dict:
    config = tiny_gpt_oss_config(VOCAB, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2,
                                 sliding_window=128)
    model = build_model(config, seed=0, dtype=dtype, lm_head_scale=4.0).to(device).eval()
    model.config._attn_implementation = attn
    gen = torch.Generator().manual_seed(0)
    lengths = [700, 150, 1100]
    rows = [torch.randint(0, VOCAB, (n,), generator=gen).to(device) for n in lengths]
    total = 2048
    packed = torch.cat([*rows, torch.zeros(total - sum(lengths), dtype=torch.int64, device=device)])[None]
    positions = torch.from_numpy(packed_position_ids(lengths, total))[None].to(device)
    packed_LV = model(input_ids=packed, use_cache=False, **packed_inputs(model, positions)).logits[0].float()
    joined_LV = model(input_ids=packed, use_cache=False).logits[0].float()
    gap = joined = mean_sum = 0.0
    start = 0
    for ids in rows:
        alone_LV = model(input_ids=ids[None], use_cache=False).logits[0].float()
        diff_LV = (packed_LV[start:start + len(ids)] - alone_LV).abs()
        gap = max(gap, diff_LV.max().item())
        mean_sum += diff_LV.sum().item()
        if start:
            joined = max(joined, (joined_LV[start:start + len(ids)] - alone_LV).abs().max().item())
        start += len(ids)
    check_packed_attention(model, torch.device(device))
    return {"attn": attn, "dtype": str(dtype).replace("torch.", ""), "packed_gap": gap, "joined_gap": joined,
            "packed_mean": mean_sum / (sum(lengths) * VOCAB)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    attns = ["eager", "sdpa", "flex_attention"] if args.device == "cuda" else ["eager", "sdpa"]
    dtypes = [torch.float32, torch.bfloat16]
    print("| attention | dtype | max / mean abs(packed - alone), logits | max abs(no boundary - alone) | check |")
    print("|---|---|---|---|---|")
    failed = False
    for attn in attns:
        for dtype in dtypes:
            try:
                r = compare(attn, dtype, args.device)
                print(f"| {r['attn']} | {r['dtype']} | {r['packed_gap']:.3g} / {r['packed_mean']:.2g} | "
                      f"{r['joined_gap']:.3g} | passes |")
            except Exception as exc:  # every combination is reported, then the exit code says
                failed = True
                print(f"| {attn} | {dtype} | - | - | {type(exc).__name__}: {str(exc)[:200]} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
