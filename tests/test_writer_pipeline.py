"""The writer pipeline fed one stream of rows for several shards: the same bytes
as writing each shard alone whatever the arrival order, one `on_shard` call per
published shard, back-pressure on open shards, and what an error leaves behind
(finished shards with their sidecars, nothing else, no writer thread)."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from common.manifest import ShardEntry, file_sha256, shard_file_name
from common.shard_writer import ShardWriter
from common.spec import HiddenSpec, ShardSpec, TargetSpec
from peaked import teacher_row
from teacher_cache.pipeline import PipelineConfig, ProgressView, WriterPipeline
from teacher_cache.plan import plan_shards

SPEC = ShardSpec(vocab_size=512, targets=TargetSpec(k=8, temperatures=(1.0, 2.0)),
                 hidden=HiddenSpec(layers=(1,), hidden_size=32, dtype="fp8", token_fraction=0.5))
NUM_ROWS, ROWS_PER_SHARD = 14, 4
PLANS = plan_shards(NUM_ROWS, ROWS_PER_SHARD)  # 4 shards: 4, 4, 4 and 2 rows
JOIN_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def rows():
    lengths = np.random.default_rng(0).integers(2, 40, NUM_ROWS)
    return [teacher_row(SPEC, row_id, int(n), seed=1).row for row_id, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def reference(rows, tmp_path_factory) -> dict[str, bytes]:
    """Each shard written alone, rows in order: the bytes every streamed run must give."""
    out = tmp_path_factory.mktemp("reference")
    with pipeline_at(out) as pipeline:
        for plan in PLANS:
            pipeline.write_shard(plan, rows[plan.row_start:plan.row_end])
    return shard_files(out)


class pipeline_at:
    """A WriterPipeline on `out` (batches of 2 rows: several record batches per shard), closed on exit."""

    def __init__(self, out: Path, **config):
        self.pipeline = WriterPipeline(out, SPEC, PipelineConfig(show_progress=False, batch_rows=2, **config),
                                       ProgressView(NUM_ROWS, enabled=False))

    def __enter__(self) -> WriterPipeline:
        return self.pipeline

    def __exit__(self, *exc):
        self.pipeline.close()


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.arrow"))}


def roughly_ascending(rows, seed: int, spread: float = 6.0) -> list:
    """Rows in ascending id order, each moved by up to `spread` places (as a backend completes them)."""
    jitter = np.random.default_rng(seed).uniform(0, spread, len(rows))
    return [rows[i] for i in np.argsort([row.row_id + j for row, j in zip(rows, jitter)], kind="stable")]


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("shard-writer")]


def leftover_tmp_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob(".tmp-*"))


def assert_published_intact(out: Path, index: int, reference: dict[str, bytes]) -> None:
    name = shard_file_name(index)
    sidecar = ShardEntry.from_dict(json.loads((out / (name + ".json")).read_text()), name)
    assert sidecar.index == index and sidecar.sha256 == file_sha256(out / name)
    assert (out / name).read_bytes() == reference[name]


def assert_not_published(out: Path, index: int) -> None:
    name = shard_file_name(index)
    assert not (out / name).exists() and not (out / (name + ".json")).exists()


def run_with_timeout(target) -> None:
    """Run `target` in a thread; a deadlock fails the test instead of hanging it."""
    errors = []

    def guarded():
        try:
            target()
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    thread = threading.Thread(target=guarded, daemon=True)
    thread.start()
    thread.join(JOIN_TIMEOUT_S)
    assert not thread.is_alive(), "the pipeline deadlocked"
    if errors:
        raise errors[0]


# ---- the bytes ------------------------------------------------------------------------------------

def test_a_shard_alone_is_the_shard_writer_fed_its_rows_in_order(rows, reference, tmp_path):
    """The reference above comes from the pipeline itself; this ties it to a plain
    ShardWriter given the rows in row-id order (same record batches and codec)."""
    for plan in PLANS:
        writer = ShardWriter(tmp_path, plan.index, SPEC, plan.row_start, plan.row_end, batch_rows=2)
        for row in rows[plan.row_start:plan.row_end]:
            writer.add(row)
        writer.close()
    assert shard_files(tmp_path) == reference


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_stream_in_any_order_writes_the_bytes_of_shard_by_shard_writing(rows, reference, tmp_path, seed):
    stream = roughly_ascending(rows, seed)
    assert [r.row_id for r in stream] != sorted(r.row_id for r in stream), "the order must be scrambled"
    plans = PLANS[::-1]  # entries come back in the caller's plan order
    with pipeline_at(tmp_path) as pipeline:
        entries = pipeline.write_shards(plans, iter(stream))
        busy = dict(pipeline.busy)
    assert [e.index for e in entries] == [p.index for p in plans]
    assert [(e.row_start, e.row_end, e.rows) for e in entries] == [(p.row_start, p.row_end, p.num_rows)
                                                                    for p in plans]
    assert shard_files(tmp_path) == reference
    for entry in entries:
        assert_published_intact(tmp_path, entry.index, reference)
    assert set(busy) == {"backend_s", "encode_s", "write_s", "close_s"} and busy["close_s"] > 0
    assert not leftover_tmp_files(tmp_path) and not writer_threads()


def test_on_shard_is_called_once_per_published_shard_even_with_one_open_shard(rows, reference, tmp_path):
    calls: list[ShardEntry] = []
    inside = threading.Lock()

    def on_shard(entry: ShardEntry) -> None:
        assert inside.acquire(blocking=False), "on_shard calls overlap"
        try:
            # Called once the shard and its sidecar are published.
            assert (tmp_path / entry.file).is_file() and (tmp_path / (entry.file + ".json")).is_file()
            calls.append(entry)
        finally:
            inside.release()

    # Rows far out of order: every shard waits for rows still to come, so opening a
    # shard beyond max_open_shards is the only way on (waiting would deadlock).
    stream = roughly_ascending(rows, seed=3, spread=NUM_ROWS)
    with pipeline_at(tmp_path, max_open_shards=1) as pipeline:
        result = {}
        run_with_timeout(lambda: result.update(entries=pipeline.write_shards(PLANS, stream, on_shard=on_shard)))
    assert sorted(calls, key=lambda e: e.index) == result["entries"]
    assert shard_files(tmp_path) == reference


@pytest.mark.parametrize("max_open_shards", [1, 2])
def test_back_pressure_keeps_at_most_max_open_shards_open(rows, reference, tmp_path, max_open_shards):
    most_open = []

    def producer():
        for row in rows:  # ascending: a new shard waits only for finished ones
            most_open.append(len(writer_threads()))
            yield row

    with pipeline_at(tmp_path, max_open_shards=max_open_shards) as pipeline:
        run_with_timeout(lambda: pipeline.write_shards(PLANS, producer()))
    assert max(most_open) <= max_open_shards
    assert shard_files(tmp_path) == reference


# ---- errors ---------------------------------------------------------------------------------------

def test_a_failing_producer_keeps_finished_shards_and_publishes_nothing_else(rows, reference, tmp_path):
    published = {0: threading.Event(), 1: threading.Event()}

    def on_shard(entry: ShardEntry) -> None:
        published.get(entry.index, threading.Event()).set()

    def producer():
        yield from rows[:PLANS[2].row_start]  # shards 0 and 1 complete
        yield rows[PLANS[2].row_start + 1]  # shard 2 and 3 opened, not complete
        yield rows[PLANS[3].row_start]
        for event in published.values():
            assert event.wait(JOIN_TIMEOUT_S)
        raise RuntimeError("the backend died")

    with pipeline_at(tmp_path) as pipeline:
        with pytest.raises(RuntimeError, match="the backend died"):
            pipeline.write_shards(PLANS, producer(), on_shard=on_shard)
    for index in (0, 1):
        assert_published_intact(tmp_path, index, reference)
    for index in (2, 3):
        assert_not_published(tmp_path, index)
    assert not leftover_tmp_files(tmp_path)
    assert not writer_threads()


def test_a_row_that_fails_to_encode_aborts_the_open_shards(rows, tmp_path):
    bad = copy.copy(rows[PLANS[1].row_start + 2])
    bad.targets.lse_PT = bad.targets.lse_PT[:, :1]  # one temperature instead of two
    stream = [bad if r.row_id == bad.row_id else r for r in rows]
    with pipeline_at(tmp_path) as pipeline:
        with pytest.raises(ValueError, match=f"row {bad.row_id}: lse must be"):
            pipeline.write_shards(PLANS, stream)
    assert_not_published(tmp_path, 1)
    assert not leftover_tmp_files(tmp_path)
    assert not writer_threads()


def test_a_missing_row_is_named_and_its_shard_not_published(rows, reference, tmp_path):
    missing = PLANS[1].row_start + 1
    with pipeline_at(tmp_path) as pipeline:
        with pytest.raises(ValueError, match=rf"shard 1: backend returned no result for rows \[{missing}\]"):
            pipeline.write_shards(PLANS, roughly_ascending([r for r in rows if r.row_id != missing], seed=4))
    assert_not_published(tmp_path, 1)
    for index in (0, 2, 3):  # complete shards are kept: a resumed run skips them
        assert_published_intact(tmp_path, index, reference)
    assert not leftover_tmp_files(tmp_path)
    assert not writer_threads()


@pytest.mark.parametrize("extra_id,message", [
    (2, r"shard 0: backend returned row 2, expected each of rows \[0, 4\) once"),
    (NUM_ROWS + 3, rf"shard 3: backend returned row {NUM_ROWS + 3}, expected each of rows \[12, 14\) once"),
])
def test_a_row_given_twice_or_outside_every_shard_is_refused(rows, tmp_path, extra_id, message):
    extra = copy.copy(rows[2])
    extra.row_id = extra_id
    stream = rows[:6] + [extra] + rows[6:]
    with pipeline_at(tmp_path) as pipeline:
        with pytest.raises(ValueError, match=message):
            pipeline.write_shards(PLANS, stream)
    # Shard 0 had all its rows before the bad one came, and may be published; nothing else is.
    assert set(shard_files(tmp_path)) <= {shard_file_name(0)}
    assert not leftover_tmp_files(tmp_path)
    assert not writer_threads()
