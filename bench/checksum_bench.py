"""What the row checksums cost the loader: rows/s with and without checking,
side by side in one run, and the hash throughput over the cells it reads.

The cache is the train bench's (top-64 + log-sum-exp at T=1,2 + two fp8
2880-wide hidden layers, rows of 4,096 tokens). Each pass reads every row
once through a `CacheLoader` with checking on, then off (order alternating
between passes); the best pass of each is reported, as rows/s and as CPU
time per row (all threads of the process). The hash table times
CRC-32 (what the format stores), Adler-32 and an 8-byte BLAKE2b over the same
cells, one row at a time, on this thread.

    python bench/checksum_bench.py [--rows 8] [--passes 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_bench import write_cache  # noqa: E402
from common.manifest import load_manifest  # noqa: E402
from common.shard_format import read_columns  # noqa: E402
from common.shard_reader import ShardReader, row_cells  # noqa: E402
from student_train.loader import CacheLoader, LoaderConfig  # noqa: E402

HIDDEN_LAYERS = (1, 2)
HASHES = {
    "crc32": zlib.crc32,
    "adler32": zlib.adler32,
    "blake2b-8": lambda data: hashlib.blake2b(data, digest_size=8).digest(),
}


def loader_pass(config: LoaderConfig) -> tuple[float, float]:
    """(rows/s, CPU ms per row) of one epoch; CPU time counts every thread of this
    process, so it is the figure less moved by other jobs on a shared machine."""
    with CacheLoader(config) as loader:
        start, cpu_start = time.perf_counter(), time.process_time()
        rows = sum(int((batch.row_ids_BR >= 0).sum()) for batch in loader.epoch_batches())
        return rows / (time.perf_counter() - start), (time.process_time() - cpu_start) / rows * 1e3


def hash_mb_per_s(cache: Path, spec, passes: int) -> tuple[float, dict[str, float]]:
    """(MB of cells per row, {hash: MB/s}) over the cells the loader reads."""
    entry = load_manifest(cache).shards[0]
    columns = read_columns(spec, HIDDEN_LAYERS)
    with ShardReader(cache / entry.file, columns=columns) as reader:
        batch = reader.read_batch(0)
        cells = [cell for name, cell in row_cells(batch, 0).items() if name in columns]
        row_bytes = sum(memoryview(cell).nbytes for cell in cells)
        rates = {}
        for name, digest in HASHES.items():
            best = float("inf")
            for _ in range(passes):
                start = time.perf_counter()
                for cell in cells:
                    digest(cell)
                best = min(best, time.perf_counter() - start)
            rates[name] = row_bytes / best / 1e6
    return row_bytes / 1e6, rates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="decode threads (1: the cost per core)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="checksum_bench_"))
    atexit.register(shutil.rmtree, work, True)  # the synthetic cache is hundreds of MB
    spec = write_cache(work / "cache", args.rows, 4096, HIDDEN_LAYERS)

    rate, cpu_ms = {True: 0.0, False: 0.0}, {True: float("inf"), False: float("inf")}
    for p in range(args.passes):
        for verify in (True, False) if p % 2 == 0 else (False, True):
            config = LoaderConfig(cache_dir=str(work / "cache"), micro_batch=1, seq_len=4096, shuffle=False,
                                  hidden_layers=HIDDEN_LAYERS, num_threads=args.threads, prefetch=2 * args.threads,
                                  pin_memory=False, verify_checksums=verify)
            rows_per_s, ms_per_row = loader_pass(config)
            rate[verify], cpu_ms[verify] = max(rate[verify], rows_per_s), min(cpu_ms[verify], ms_per_row)
    row_mb, hash_rates = hash_mb_per_s(work / "cache", spec, args.passes)

    print(f"rows of 4,096 tokens, top-64, two fp8 2880-wide layers; {args.rows} rows x {args.passes} passes, "
          f"{args.threads} decode thread(s), best pass")
    print("| loader rows/s checked | unchecked | ratio | CPU ms/row checked | unchecked | ratio | "
          "cells hashed per row (MB) | " + " | ".join(f"{name} MB/s" for name in HASHES) + " |")
    print("|---" * (7 + len(HASHES)) + "|")
    print(f"| {rate[True]:.2f} | {rate[False]:.2f} | {rate[True] / rate[False]:.3f} | {cpu_ms[True]:.1f} | "
          f"{cpu_ms[False]:.1f} | {cpu_ms[True] / cpu_ms[False]:.3f} | {row_mb:.1f} | "
          + " | ".join(f"{r:,.0f}" for r in hash_rates.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
