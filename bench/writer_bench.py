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
    ap.add_argument("--busy-thread", action="store_true",
                    help="a pure-Python thread spins beside the writer (like an in-process engine); compares the "
                         "default GIL switch interval with the pipeline's")
    args = ap.parse_args()
    if args.busy_thread:
        return busy_thread_comparison(args)
    cases = {
        "top-64": ShardSpec(vocab_size=VOCAB, targets=TargetSpec(k=64)),
        "top-64 + 2 fp8 layers": ShardSpec(vocab_size=VOCAB, targets=TargetSpec(k=64),
                                           hidden=HiddenSpec(layers=(12, 24), dtype="fp8", hidden_size=WIDTH)),
    }
    print("| targets | rows x tokens | from_pydict ms/row | build_batch ms/row | compression | writer tok/s (build, "
          "compress, write, sha256, fsync) | file B/token |")
    print("|---|---|---|---|---|---|---|")
    for name, spec in cases.items():
        cells = [encode_row(synthetic_row(i, args.seq_len, spec, np.random.default_rng(i)), spec)
                 for i in range(args.rows)]
        schema = build_schema(spec)
        # from_pydict takes binary cells as bytes only (fp8 hidden cells are array views)
        as_py = lambda c, n: (c[n].tobytes() if pa.types.is_binary(schema.field(n).type)  # noqa: E731
                              and isinstance(c.get(n), np.ndarray) else c.get(n))
        pydict = best_of(lambda: [pa.RecordBatch.from_pydict({n: [as_py(c, n)] for n in schema.names}, schema=schema)
                                  for c in cells], args.repeats) / args.rows
        direct = best_of(lambda: [build_batch([c], schema) for c in cells], args.repeats) / args.rows

        for compression in ("zstd", "lz4", "none"):
            written = {}

            def write():
                with tempfile.TemporaryDirectory() as out:
                    writer = ShardWriter(Path(out), 0, spec, 0, args.rows, compression=compression)
                    for c in cells:
                        writer.add_cells(c)
                    written["bytes"] = writer.close().bytes

            tokens = args.rows * args.seq_len
            tok_s = tokens / best_of(write, args.repeats)
            print(f"| {name} | {args.rows} x {args.seq_len} | {pydict * 1e3:.1f} | {direct * 1e3:.1f} | {compression} "
                  f"| {tok_s:,.0f} | {written['bytes'] / tokens:,.1f} |")


def busy_thread_comparison(args) -> None:
    import threading

    from common.gil import SWITCH_INTERVAL_S as GIL_SWITCH_INTERVAL_S

    spec = ShardSpec(vocab_size=VOCAB, targets=TargetSpec(k=64),
                     hidden=HiddenSpec(layers=(12, 24), dtype="fp8", hidden_size=WIDTH))
    cells = [encode_row(synthetic_row(i, args.seq_len, spec, np.random.default_rng(i)), spec) for i in range(args.rows)]

    def write():
        with tempfile.TemporaryDirectory() as out:
            writer = ShardWriter(Path(out), 0, spec, 0, args.rows)
            for c in cells:
                writer.add_cells(c)
            writer.close()

    tokens = args.rows * args.seq_len
    rows = [("alone", sys.getswitchinterval(), tokens / best_of(write, args.repeats))]
    stop = threading.Event()

    def spin():
        x = 0
        while not stop.is_set():
            x += 1

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    default = sys.getswitchinterval()
    try:
        for interval in (default, GIL_SWITCH_INTERVAL_S):
            sys.setswitchinterval(interval)
            rows.append(("beside a busy Python thread", interval, tokens / best_of(write, args.repeats)))
    finally:
        sys.setswitchinterval(default)
        stop.set()
        spinner.join()
    print("| writer (top-64 + 2 fp8 layers) | GIL switch interval | tok/s |")
    print("|---|---|---|")
    for name, interval, tok_s in rows:
        print(f"| {name} | {interval * 1e3:.1f} ms | {tok_s:,.0f} |")


if __name__ == "__main__":
    main()
