"""What the cache loader's decode threads cost a training loop beside them.

The main thread stands in for a training step's kernel launches: a loop of
small torch ops (launch-bound work holds the GIL and needs a free core). It is
timed alone, then while a `CacheLoader` decodes micro batches in background
threads, taken one per `--step-ms` as a training loop would, from a synthetic
cache (top-64 + two fp8 2880-wide hidden layers, rows of 4,096 tokens, the
train bench's cache). Also reports decode ms per row.

    python bench/loader_bench.py [--rows 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_bench import write_cache  # noqa: E402
from student_train.loader import CacheLoader, LoaderConfig  # noqa: E402


def launch_loop(seconds: float) -> float:
    """Small torch ops per second on this thread."""
    a = torch.randn(32, 32)
    ops, stop = 0, time.perf_counter() + seconds
    while time.perf_counter() < stop:
        for _ in range(100):
            a = torch.tanh(a @ a * 0.01)
        ops += 100
    return ops / seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--step-ms", type=float, default=100.0,
                    help="the loop takes one micro batch per this many ms, as a training step would")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loader_bench_"))
    atexit.register(shutil.rmtree, work, True)  # the synthetic cache is hundreds of MB
    write_cache(work / "cache", args.rows, 4096, (1, 2))
    config = LoaderConfig(cache_dir=str(work / "cache"), micro_batch=1, seq_len=4096, hidden_layers=(1, 2),
                          num_threads=args.threads, prefetch=2 * args.threads, seed=0)
    alone = launch_loop(args.seconds)  # before any decoding has started a thread in this process
    with CacheLoader(config) as loader:
        start = time.perf_counter()
        count = sum(1 for _ in loader.epoch_batches())
        decode_ms = (time.perf_counter() - start) / count * 1e3
        stop = threading.Event()
        decoded = [0]

        def consume():
            batches = iter(loader)
            while not stop.is_set():
                next(batches)
                decoded[0] += 1
                stop.wait(args.step_ms / 1e3)

        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
        beside = launch_loop(args.seconds)
        stop.set()
        consumer.join()
    print(f"| decode threads | torch threads | step ms | loader ms/row (alone, {args.threads} threads) | main-thread ops/s alone | "
          f"beside the loader | ratio | rows decoded meanwhile |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.threads} | {torch.get_num_threads()} | {args.step_ms:.0f} | {decode_ms:.1f} | {alone:,.0f} | {beside:,.0f} | "
          f"{beside / alone:.3f} | {decoded[0]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
