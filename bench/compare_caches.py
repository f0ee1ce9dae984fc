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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.cache_dir import CacheDir  # noqa: E402
from teacher_cache.compare import compare  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache_a", type=Path)
    ap.add_argument("cache_b", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    try:
        report = compare(CacheDir(args.cache_a).read_rows(), CacheDir(args.cache_b).read_rows())
    except ValueError as exc:  # ShardFormatError too: a damaged cache is named by its file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if report["same_row_ids"] and report.get("same_tokens") else 1


if __name__ == "__main__":
    sys.exit(main())
