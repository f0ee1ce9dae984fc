"""Shard writer throughput: tokens/s one writer thread sustains, and the cost of
building record batches (`build_batch` vs pyarrow's `from_pydict`), side by side.

    python bench/writer_bench.py [--rows 8] [--seq-len 4096]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_bench import synthetic_row  # noqa: E402
from common.shard_format import build_schema, encode_row  # noqa: E402
from common.shard_writer import ShardWriter, build_batch  # noqa: E402
from common.spec import HiddenSpec, ShardSpec, TargetSpec  # noqa: E402

VOCAB, WIDTH = 201_088, 2880


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cases = {
        "top-64": ShardSpec(vocab_size=VOCAB, targets=TargetSpec(k=64)),
        "top-64 + 2 fp8 layers": ShardSpec(vocab_size=VOCAB, targets=TargetSpec(k=64),
                                           hidden=HiddenSpec(layers=(12, 24), dtype="fp8", hidden_size=WIDTH)),
    }
    print(f"| targets | rows x tokens | from_pydict ms/row | build_batch ms/row | writer tok/s (build, compress, "
          f"write, sha256, fsync) |")
    print("|---|---|---|---|---|")
    for name, spec in cases.items():
        cells = [encode_row(synthetic_row(i, args.seq_len, spec, np.random.default_rng(i)), spec)
                 for i in range(args.rows)]
        schema = build_schema(spec)
        pydict = best_of(lambda: [pa.RecordBatch.from_pydict({n: [c.get(n)] for n in schema.names}, schema=schema)
                                  for c in cells], args.repeats) / args.rows
        direct = best_of(lambda: [build_batch([c], schema) for c in cells], args.repeats) / args.rows

        def write():
            with tempfile.TemporaryDirectory() as out:
                writer = ShardWriter(Path(out), 0, spec, 0, args.rows)
                for c in cells:
                    writer.add_cells(c)
                writer.close()

        tok_s = args.rows * args.seq_len / best_of(write, args.repeats)
        print(f"| {name} | {args.rows} x {args.seq_len} | {pydict * 1e3:.1f} | {direct * 1e3:.1f} | {tok_s:,.0f} |")


if __name__ == "__main__":
    main()
