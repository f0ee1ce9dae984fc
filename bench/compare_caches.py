"""Compare two top-k caches of the same source rows, row by row: e.g. one
written on a GPU (bf16 lm_head, several workers) against one written on the
CPU. Rows are matched by row_id; every row must be present in both.

    python bench/compare_caches.py CACHE_A CACHE_B [--json OUT.json]

Prints the row coverage, the largest log-sum-exp difference, the mean overlap
of the top-k id sets per position, the mean |logit| difference on shared ids,
and the smallest cosine between hidden-state rows. Exits 1 when the rows or
token ids differ, 2 when a cache is damaged or the two hold different kinds
of targets or hidden layers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.shard_format import TeacherRow  # noqa: E402
from common.shard_reader import read_cache_rows  # noqa: E402


def compare(a: dict[int, TeacherRow], b: dict[int, TeacherRow]) -> dict:
    report = {"rows_a": len(a), "rows_b": len(b), "same_row_ids": sorted(a) == sorted(b)}
    if not report["same_row_ids"]:
        return report
    lse_diff, overlap, logit_diff, min_cos, same_tokens = 0.0, [], [], 1.0, True
    for rid in sorted(a):
        ra, rb = a[rid], b[rid]
        if (ra.topk_ids_PK is None) != (rb.topk_ids_PK is None) or set(ra.hidden) != set(rb.hidden):
            raise ValueError(f"row {rid}: the caches hold different targets or hidden layers "
                             f"(layers {sorted(ra.hidden)} and {sorted(rb.hidden)}); nothing to compare")
        if not (np.array_equal(ra.input_ids_L, rb.input_ids_L) and np.array_equal(ra.labels_L, rb.labels_L)):
            same_tokens = False  # other tokens: their targets are not comparable
            continue
        if ra.lse_PT is not None:
            lse_diff = max(lse_diff, float(np.abs(ra.lse_PT - rb.lse_PT).max(initial=0.0)))
        if ra.topk_ids_PK is not None:
            for p in range(ra.topk_ids_PK.shape[0]):
                shared, ia, ib = np.intersect1d(ra.topk_ids_PK[p], rb.topk_ids_PK[p], return_indices=True)
                overlap.append(len(shared) / ra.topk_ids_PK.shape[1])
                if len(shared):
                    logit_diff.append(float(np.abs(ra.topk_logits_PK[p, ia] - rb.topk_logits_PK[p, ib]).mean()))
        for layer, h_a in ra.hidden.items():
            cos = torch.nn.functional.cosine_similarity(h_a.double(), rb.hidden[layer].double(), dim=-1)
            min_cos = min(min_cos, float(cos.min()))
    report.update(same_tokens=bool(same_tokens), max_lse_diff=lse_diff,
                  mean_topk_overlap=float(np.mean(overlap)) if overlap else None,
                  mean_abs_logit_diff=float(np.mean(logit_diff)) if logit_diff else None,
                  min_hidden_cosine=min_cos)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache_a", type=Path)
    ap.add_argument("cache_b", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    try:
        report = compare(read_cache_rows(args.cache_a), read_cache_rows(args.cache_b))
    except ValueError as exc:  # ShardFormatError too: a damaged cache is named by its file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if report["same_row_ids"] and report.get("same_tokens") else 1


if __name__ == "__main__":
    sys.exit(main())
