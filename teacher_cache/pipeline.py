"""The writer pipeline every backend feeds: encode threads -> one writer thread
-> atomic shard files, with a progress bar and an end-of-run summary.

A backend yields a shard's rows in any order. Each row is encoded
(`encode_row`) in a thread pool as it arrives; the writer thread appends rows to
the shard strictly in row-id order, as soon as the next one is encoded. So a
shard's bytes never depend on completion order, batching or timing, and rows
that arrive early wait in memory as encoded cells (at most one shard's worth).
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from common.manifest import ShardEntry
from common.shard_format import TeacherRow, encode_row
from common.shard_writer import DEFAULT_BATCH_ROWS, DEFAULT_ZSTD_LEVEL, ShardWriter
from common.spec import ShardSpec
from teacher_cache.plan import ShardPlan


@dataclass(frozen=True)
class PipelineConfig:
    encode_threads: int = 2
    zstd_level: int = DEFAULT_ZSTD_LEVEL
    compression: str = "zstd"  # zstd | lz4 | none (Arrow IPC buffer compression)
    batch_rows: int = DEFAULT_BATCH_ROWS
    show_progress: bool = True


@dataclass
class RunSummary:
    rows: int = 0
    tokens: int = 0
    bytes: int = 0
    shards: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0
    num_gpus: int = 0
    gpu_hour_price: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    @property
    def gpu_hours(self) -> float:
        return self.seconds / 3600.0 * self.num_gpus

    @property
    def cost_per_million_tokens(self) -> float | None:
        if self.gpu_hour_price is None or not self.tokens:
            return None
        return self.gpu_hours * self.gpu_hour_price / (self.tokens / 1e6)

    def lines(self) -> list[str]:
        out = [f"wrote {self.shards} shard(s), {self.rows:,} rows, {self.tokens:,} tokens, "
               f"{self.bytes / 1e9:.3f} GB ({self.bytes_per_token:.1f} bytes/token)"
               + (f"; {self.shards_skipped} finished shard(s) verified and kept" if self.shards_skipped else ""),
               f"{self.seconds:.1f} s, {self.tokens_per_s:,.0f} tokens/s"
               + (f", {self.gpu_hours:.4f} GPU-hours on {self.num_gpus} GPU(s)" if self.num_gpus else ", no GPU")]
        cost = self.cost_per_million_tokens
        if cost is not None:
            out.append(f"cost {cost:.4f} per million tokens at {self.gpu_hour_price} per GPU-hour")
        return out


class ProgressView:
    """Rows, tokens/s, bytes/token (of finished shards) and ETA; thread-safe."""

    def __init__(self, total_rows: int, enabled: bool, description: str = "caching"):
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self.rows = self.tokens = self.done_tokens = self.done_bytes = 0
        self._progress = None
        if enabled:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                TextColumn("{task.fields[tok_s]} tok/s"), TextColumn("{task.fields[bpt]} B/tok"),
                TimeRemainingColumn(), console=Console(stderr=True))
            self._task = self._progress.add_task(description, total=total_rows, tok_s="-", bpt="-")
            self._progress.start()

    def row_written(self, tokens: int) -> None:
        with self._lock:
            self.rows += 1
            self.tokens += tokens
            self._refresh()

    def shard_written(self, entry: ShardEntry) -> None:
        with self._lock:
            self.done_tokens += entry.tokens
            self.done_bytes += entry.bytes
            self._refresh()

    def set_totals(self, rows: int, tokens: int, bytes_: int) -> None:
        """Progress counted elsewhere (finished shards of worker processes)."""
        with self._lock:
            self.rows, self.tokens = rows, tokens
            self.done_tokens, self.done_bytes = tokens, bytes_
            self._refresh()

    def _refresh(self) -> None:
        if self._progress is None:
            return
        elapsed = max(time.monotonic() - self._start, 1e-9)
        bpt = f"{self.done_bytes / self.done_tokens:.1f}" if self.done_tokens else "-"
        self._progress.update(self._task, completed=self.rows, tok_s=f"{self.tokens / elapsed:,.0f}", bpt=bpt)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


# The writer thread hands the GIL back and forth many times per row (Arrow calls
# release it), while the backend's thread (an in-process vLLM engine, mostly
# Python) holds it for whole switch intervals: at Python's default 5 ms the
# writer waits in a convoy. 0.5 ms measured 2.2x faster writes beside a busy
# Python thread (bench/writer_bench.py --busy-thread).
GIL_SWITCH_INTERVAL_S = 0.0005


class WriterPipeline:
    def __init__(self, cache_dir: Path, spec: ShardSpec, config: PipelineConfig, progress: ProgressView):
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, GIL_SWITCH_INTERVAL_S))
        self.cache_dir = Path(cache_dir)
        self.spec, self.config, self.progress = spec, config, progress
        self._pool = ThreadPoolExecutor(max_workers=max(1, config.encode_threads), thread_name_prefix="encode")
        # Busy seconds of each stage, summed over threads: where a slow run spends its time.
        self.busy = {"backend_s": 0.0, "encode_s": 0.0, "write_s": 0.0}
        self._busy_lock = threading.Lock()

    def _timed_encode(self, row: TeacherRow) -> dict:
        start = time.perf_counter()
        cells = encode_row(row, self.spec)
        with self._busy_lock:
            self.busy["encode_s"] += time.perf_counter() - start
        return cells

    def write_shard(self, plan: ShardPlan, rows: Iterable[TeacherRow]) -> ShardEntry:
        """Encode and write one shard's rows (any order); returns its entry once the
        shard and its sidecar are published. Nothing is published on error."""
        writer = ShardWriter(self.cache_dir, plan.index, self.spec, plan.row_start, plan.row_end,
                             batch_rows=self.config.batch_rows, zstd_level=self.config.zstd_level,
                             compression=self.config.compression)
        encoded: dict[int, Future] = {}
        ready = threading.Condition()
        state = {"produced": False, "error": None}

        def write_in_order():
            try:
                for row_id in range(plan.row_start, plan.row_end):
                    with ready:
                        ready.wait_for(lambda: row_id in encoded or state["produced"])
                        future = encoded.pop(row_id, None)
                    if future is None:  # the producer finished without this row
                        return
                    cells = future.result()
                    start = time.perf_counter()
                    writer.add_cells(cells)
                    self.busy["write_s"] += time.perf_counter() - start
                    self.progress.row_written(len(cells["input_ids"]))
            except BaseException as exc:  # handed to the producer thread, which raises it
                state["error"] = exc

        thread = threading.Thread(target=write_in_order, name=f"shard-writer-{plan.index}", daemon=True)
        thread.start()
        seen: set[int] = set()
        rows = iter(rows)
        try:
            while True:
                start = time.perf_counter()
                row = next(rows, None)
                self.busy["backend_s"] += time.perf_counter() - start
                if row is None:
                    break
                if not (plan.row_start <= row.row_id < plan.row_end) or row.row_id in seen:
                    raise ValueError(f"shard {plan.index}: backend returned row {row.row_id}, expected each of rows "
                                     f"[{plan.row_start}, {plan.row_end}) once")
                seen.add(row.row_id)
                future = self._pool.submit(self._timed_encode, row)
                with ready:
                    encoded[row.row_id] = future
                    ready.notify_all()
                if state["error"] is not None:
                    break
        except BaseException:
            with ready:
                state["produced"] = True
                ready.notify_all()
            thread.join()
            writer.abort()
            raise
        with ready:
            state["produced"] = True
            ready.notify_all()
        thread.join()
        if state["error"] is not None:
            writer.abort()
            raise state["error"]
        if len(seen) != plan.num_rows:
            writer.abort()
            missing = sorted(set(range(plan.row_start, plan.row_end)) - seen)
            raise ValueError(f"shard {plan.index}: backend returned no result for rows {missing[:10]}")
        start = time.perf_counter()
        entry = writer.close()
        self.busy["write_s"] += time.perf_counter() - start
        self.progress.shard_written(entry)
        return entry

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        sys.setswitchinterval(self._switch_interval)
