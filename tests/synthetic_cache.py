"""The one way tests write a synthetic cache: rows given per shard go through
the product's shard writer and the manifest is rebuilt from the sidecars, as
`cache-teacher` does. What rows to write is the caller's (`peaked.py`,
`train_fixtures.py`, the loader tests' synthetic rows)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from common.cache_dir import CacheDir
from common.manifest import CacheManifest
from common.shard_format import TeacherRow, encode_row
from common.shard_writer import DEFAULT_BATCH_ROWS, ShardWriter
from common.spec import ShardSpec


def write_cache_rows(cache_dir: Path, spec: ShardSpec, shards: Iterable[list[TeacherRow]], *,
                     batch_rows: int = DEFAULT_BATCH_ROWS, teacher: dict | None = None,
                     source: dict | None = None, work: dict | None = None, compression: str = "zstd",
                     encode: Callable[[TeacherRow, ShardSpec], dict] = encode_row) -> Path:
    """Shard i holds the i-th list of rows, over source rows [first, first + len)
    counted across the shards; `encode` turns a row into its cells (a test may
    plant a bad cell there). Returns the cache directory."""
    cache = CacheDir(cache_dir)
    cache.path.mkdir(parents=True, exist_ok=True)
    row_start = 0
    for index, rows in enumerate(shards):
        with ShardWriter(cache.path, index, spec, row_start, row_start + len(rows), batch_rows=batch_rows,
                         compression=compression) as writer:
            for row in rows:
                writer.add_cells(encode(row, spec))
            writer.close()
        row_start += len(rows)
    cache.refresh_manifest(CacheManifest(spec=spec, teacher=teacher or {}, tokenizer={"vocab_size": spec.vocab_size},
                                         source=source or {}, work=work or {}))
    return cache.path
