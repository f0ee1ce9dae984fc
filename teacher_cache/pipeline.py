"""The writer pipeline every backend feeds: one stream of rows -> encode threads
-> one in-order writer thread per open shard -> atomic shard files, with a
progress bar and an end-of-run summary.

A backend yields the rows of all the shards a run writes as one stream, in any
order (roughly ascending). Each row is routed to its shard by row id and
encoded (`encode_row`) in a thread pool as it arrives; the shard's writer
thread appends its rows strictly in row-id order, as soon as the next one is
encoded. So a shard's bytes never depend on completion order, batching or
timing, and rows that arrive early wait in memory as encoded cells.

Why one stream and a thread per shard: finalising a shard (compress its last
rows, fsync and publish the file, re-read it for its sha256, write its sidecar,
refresh the manifest) takes seconds for shards with hidden states. Done between
per-shard backend runs, it drained the backend at every shard boundary and left
the GPU idle meanwhile (measured on an H100: 46k tokens/s captured, 18k tokens/s
captured and written). Here the shard's own thread finalises it while the
backend goes on with the next shards' rows; the backend waits only for
back-pressure, when `max_open_shards` shards are open.
"""

from __future__ import annotations

import bisect
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from common.gil import shorten_switch_interval
from common.manifest import ShardEntry
from common.shard_format import TeacherRow, encode_row
from common.shard_writer import DEFAULT_BATCH_ROWS, DEFAULT_ZSTD_LEVEL, ShardWriter, buffer_codec
from common.spec import ShardSpec
from teacher_cache.plan import ShardPlan


@dataclass(frozen=True)
class PipelineConfig:
    """The `writer` section of a cache config."""

    encode_threads: int = field(default=2, metadata={"flag": "--encode-threads"})  # threads encoding rows
    zstd_level: int = field(default=DEFAULT_ZSTD_LEVEL, metadata={"flag": "--zstd-level"})
    # zstd | lz4 (faster writes) | none: Arrow IPC buffer compression
    compression: str = field(default="zstd", metadata={"flag": "--compression"})
    batch_rows: int = DEFAULT_BATCH_ROWS
    show_progress: bool = True  # a live progress bar (`--no-progress`: false)
    # Shards being written at once; opening one more waits for the oldest to be
    # published. Bounds the encoded rows held in memory and the concurrent finalising.
    max_open_shards: int = 4

    def __post_init__(self):
        buffer_codec(self.compression, self.zstd_level)  # ValueError naming a bad compression
        for flag, value in (("--encode-threads", self.encode_threads), ("writer.batch_rows", self.batch_rows),
                            ("writer.max_open_shards", self.max_open_shards)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")


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


class _FirstError:
    """The first exception raised by any writer thread, for the producer to re-raise."""

    def __init__(self):
        self._lock = threading.Lock()
        self.error: BaseException | None = None

    def record(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc

    def raise_if_any(self) -> None:
        if self.error is not None:
            raise self.error


class _RowRouter:
    """Row id -> position of the plan holding it (bisect over the plans' starts)."""

    def __init__(self, plans: Sequence[ShardPlan]):
        self._order = sorted(range(len(plans)), key=lambda i: plans[i].row_start)
        ordered = [plans[i] for i in self._order]
        for before, after in zip(ordered, ordered[1:]):
            if before.row_end > after.row_start:
                raise ValueError(f"shards {before.index} [{before.row_start}, {before.row_end}) and {after.index} "
                                 f"[{after.row_start}, {after.row_end}) overlap")
        self._plans = plans
        self._starts = [p.row_start for p in ordered]

    def position_of(self, row_id: int) -> int:
        """The plan's position in the caller's list; ValueError (naming the nearest shard) if none holds it."""
        if not self._starts:
            raise ValueError(f"backend returned row {row_id}, but no shard is being written")
        at = max(bisect.bisect_right(self._starts, row_id) - 1, 0)
        position = self._order[at]
        plan = self._plans[position]
        if not plan.row_start <= row_id < plan.row_end:
            raise _unexpected_row(plan, row_id)
        return position


def _unexpected_row(plan: ShardPlan, row_id: int) -> ValueError:
    return ValueError(f"shard {plan.index}: backend returned row {row_id}, expected each of rows "
                      f"[{plan.row_start}, {plan.row_end}) once")


class _ShardJob:
    """One open shard: its rows' encode futures and the thread that appends them
    in row-id order and, after the last one, publishes the shard and announces it.

    Only the producer thread calls `add`, `end_stream` and `cancel`; the shard's
    own thread touches the ShardWriter until it ends (join it before `abort`)."""

    def __init__(self, plan: ShardPlan, writer: ShardWriter, append: Callable[[ShardWriter, dict], None],
                 publish: Callable[[ShardWriter], ShardEntry], announce: Callable[[ShardEntry], None],
                 failure: _FirstError):
        self.plan, self.writer = plan, writer
        self._append, self._publish, self._announce, self._failure = append, publish, announce, failure
        self.received: set[int] = set()
        self._encoded: dict[int, Future] = {}
        self._ready = threading.Condition()
        self._stream_ended = self._cancelled = False
        self.entry: ShardEntry | None = None
        self.thread = threading.Thread(target=self._write_in_order, name=f"shard-writer-{plan.index}", daemon=True)
        self.thread.start()

    @property
    def all_rows_received(self) -> bool:
        return len(self.received) == self.plan.num_rows

    def add(self, row_id: int, encoded: Future) -> None:
        with self._ready:
            self._encoded[row_id] = encoded
            self._ready.notify_all()

    def end_stream(self) -> None:
        """No more rows will come: a missing row now ends the thread without publishing."""
        with self._ready:
            self._stream_ended = True
            self._ready.notify_all()

    def cancel(self) -> None:
        """Stop at the next row; nothing is published (the caller aborts the writer after joining)."""
        with self._ready:
            self._cancelled = True
            self._ready.notify_all()

    def _next_encoded(self, row_id: int) -> Future | None:
        with self._ready:
            self._ready.wait_for(lambda: row_id in self._encoded or self._stream_ended or self._cancelled)
            if self._cancelled:
                return None
            return self._encoded.pop(row_id, None)

    def _write_in_order(self) -> None:
        try:
            for row_id in range(self.plan.row_start, self.plan.row_end):
                encoded = self._next_encoded(row_id)
                if encoded is None:  # the stream ended without this row, or the run is being aborted
                    return
                self._append(self.writer, encoded.result())
            with self._ready:
                if self._cancelled:
                    return
            self.entry = self._publish(self.writer)
            self._announce(self.entry)
        except BaseException as exc:  # re-raised by the producer thread
            self._failure.record(exc)


class WriterPipeline:
    def __init__(self, cache_dir: Path, spec: ShardSpec, config: PipelineConfig, progress: ProgressView):
        if config.max_open_shards < 1:
            raise ValueError(f"max_open_shards must be >= 1, got {config.max_open_shards}")
        self._switch_interval = shorten_switch_interval()  # see common.gil
        self.cache_dir = Path(cache_dir)
        self.spec, self.config, self.progress = spec, config, progress
        self._pool = ThreadPoolExecutor(max_workers=max(1, config.encode_threads), thread_name_prefix="encode")
        # Busy seconds of each stage, summed over threads: where a slow run spends its time.
        # close_s: finalising shards (flush, publish, sha256, sidecar, on_shard), off the producer's thread.
        self.busy = {"backend_s": 0.0, "encode_s": 0.0, "write_s": 0.0, "close_s": 0.0}
        self._busy_lock = threading.Lock()
        self._on_shard_lock = threading.Lock()

    def _add_busy(self, stage: str, seconds: float) -> None:
        with self._busy_lock:
            self.busy[stage] += seconds

    def _timed_encode(self, row: TeacherRow) -> dict:
        start = time.perf_counter()
        cells = encode_row(row, self.spec)
        self._add_busy("encode_s", time.perf_counter() - start)
        return cells

    def write_shard(self, plan: ShardPlan, rows: Iterable[TeacherRow]) -> ShardEntry:
        """Encode and write one shard's rows (any order); returns its entry once the
        shard and its sidecar are published. Nothing is published on error."""
        return self.write_shards([plan], rows)[0]

    def write_shards(self, plans: Sequence[ShardPlan], rows: Iterable[TeacherRow],
                     on_shard: Callable[[ShardEntry], None] | None = None) -> list[ShardEntry]:
        """Write the shards of `plans` from one stream of their rows (any order;
        roughly ascending keeps few shards open); returns their entries in plan order.

        Each shard is opened at its first row and published by its own thread
        after its last, which then calls `on_shard(entry)` (one call at a time),
        so the producer (the backend) never waits for a shard to be finalised.
        On error, shards already published stay (with sidecars: resume keeps
        them) and nothing is published for the others; the error is re-raised."""
        plans = list(plans)
        router = _RowRouter(plans)
        failure = _FirstError()
        jobs: dict[int, _ShardJob] = {}  # plan position -> its job, once its first row arrived
        open_jobs: list[_ShardJob] = []  # in opening order, pruned as they finish
        rows = iter(rows)

        def open_job(position: int) -> _ShardJob:
            self._wait_for_room(open_jobs)
            job = jobs[position] = self._open(plans[position], on_shard, failure)
            open_jobs.append(job)
            return job

        try:
            for row in self._timed(rows):
                position = router.position_of(row.row_id)
                job = jobs[position] if position in jobs else open_job(position)
                if row.row_id in job.received:
                    raise _unexpected_row(job.plan, row.row_id)
                job.received.add(row.row_id)
                job.add(row.row_id, self._pool.submit(self._timed_encode, row))
                failure.raise_if_any()
            for position, plan in enumerate(plans):
                if plan.num_rows == 0 and position not in jobs:  # nothing to wait for: an empty shard
                    open_job(position)
            for job in jobs.values():
                job.end_stream()
            for job in jobs.values():
                job.thread.join()
            failure.raise_if_any()
            return [self._entry_of(plan, jobs.get(position)) for position, plan in enumerate(plans)]
        except BaseException:
            for job in jobs.values():
                job.cancel()
            for job in jobs.values():
                job.thread.join()
            close = getattr(rows, "close", None)
            if close is not None:  # a generator backend aborts its in-flight work
                close()
            raise
        finally:
            for job in jobs.values():
                if job.entry is None:  # its thread has ended: the writer is ours to abort
                    job.writer.abort()

    def _timed(self, rows: Iterator[TeacherRow]) -> Iterator[TeacherRow]:
        """`rows`, counting the time spent waiting for each as backend time."""
        while True:
            start = time.perf_counter()
            row = next(rows, None)
            self._add_busy("backend_s", time.perf_counter() - start)
            if row is None:
                return
            yield row

    def _wait_for_room(self, open_jobs: list[_ShardJob]) -> None:
        """Back-pressure before opening a shard: while `max_open_shards` are open,
        wait for the oldest one that has all its rows to be published. A shard
        still missing rows waits on the producer itself, so waiting for it would
        deadlock; when every open shard is such a one (rows far out of order),
        the new shard opens beyond the limit."""
        while True:
            open_jobs[:] = [job for job in open_jobs if job.thread.is_alive()]
            if len(open_jobs) < self.config.max_open_shards:
                return
            fed = next((job for job in open_jobs if job.all_rows_received), None)
            if fed is None:
                return
            fed.thread.join()

    def _open(self, plan: ShardPlan, on_shard: Callable[[ShardEntry], None] | None,
              failure: _FirstError) -> _ShardJob:
        writer = ShardWriter(self.cache_dir, plan.index, self.spec, plan.row_start, plan.row_end,
                             batch_rows=self.config.batch_rows, zstd_level=self.config.zstd_level,
                             compression=self.config.compression)

        def announce(entry: ShardEntry) -> None:
            start = time.perf_counter()
            self.progress.shard_written(entry)
            if on_shard is not None:
                with self._on_shard_lock:
                    on_shard(entry)
            self._add_busy("close_s", time.perf_counter() - start)

        return _ShardJob(plan, writer, self._append, self._publish, announce, failure)

    def _publish(self, writer: ShardWriter) -> ShardEntry:
        """Flush, publish, sha256 and sidecar: the work the backend no longer waits for."""
        start = time.perf_counter()
        entry = writer.close()
        self._add_busy("close_s", time.perf_counter() - start)
        return entry

    def _append(self, writer: ShardWriter, cells: dict) -> None:
        start = time.perf_counter()
        writer.add_cells(cells)
        self._add_busy("write_s", time.perf_counter() - start)
        self.progress.row_written(len(cells["input_ids"]))

    @staticmethod
    def _entry_of(plan: ShardPlan, job: _ShardJob | None) -> ShardEntry:
        if job is not None and job.entry is not None:
            return job.entry
        received = job.received if job is not None else set()
        missing = sorted(set(range(plan.row_start, plan.row_end)) - received)
        assert missing, f"shard {plan.index}: every row arrived, yet it was not published"
        raise ValueError(f"shard {plan.index}: backend returned no result for rows {missing[:10]}")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        sys.setswitchinterval(self._switch_interval)
