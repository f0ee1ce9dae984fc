"""Atomic shard writer: rows -> zstd Arrow IPC file -> rename -> sidecar.

The shard is written under a hidden temporary name, fsynced and renamed; only
then is its sidecar (rows, bytes, sha256) written. A killed writer leaves at
most a `.tmp-*` file, which the next run deletes; a shard without a sidecar is
never trusted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from common.atomic import tmp_path_for
from common.cache_dir import CacheDir
from common.manifest import ShardEntry, shard_file_name
from common.shard_format import CHECKSUM_COLUMN, TeacherRow, build_schema, encode_row
from common.spec import ShardSpec

DEFAULT_BATCH_ROWS = 16
# A record batch is the unit a reader decompresses, and the trainer reads rows
# in random order: past about 1 MiB of raw cells a batch gains little
# compression and makes every random read decompress rows it does not need.
# Production rows (4096 tokens) are each over this, so they get a batch each.
DEFAULT_BATCH_BYTES = 1 << 20
DEFAULT_ZSTD_LEVEL = 3


class ShardWriter:
    def __init__(self, cache_dir: Path, index: int, spec: ShardSpec, row_start: int, row_end: int,
                 batch_rows: int = DEFAULT_BATCH_ROWS, zstd_level: int = DEFAULT_ZSTD_LEVEL,
                 batch_bytes: int = DEFAULT_BATCH_BYTES, compression: str = "zstd"):
        self.cache_dir = Path(cache_dir)
        self.index = index
        self.spec = spec
        self.row_start, self.row_end = row_start, row_end
        self.batch_rows = batch_rows
        self.batch_bytes = batch_bytes
        self._pending_bytes = 0
        self.schema = build_schema(spec)
        self.final_path = self.cache_dir / shard_file_name(index)
        self.tmp_path = tmp_path_for(self.final_path)
        options = ipc.IpcWriteOptions(compression=buffer_codec(compression, zstd_level))
        # A native sink: Arrow writes without taking the GIL (a Python file object
        # would make every buffer write wait for the GIL the backend and encode threads hold).
        self._sink = pa.OSFile(str(self.tmp_path), "wb")
        self._writer = ipc.new_file(self._sink, self.schema, options=options)
        self._pending: list[dict] = []
        self.rows = self.tokens = self.positions = 0

    def add(self, row: TeacherRow) -> None:
        self.add_cells(encode_row(row, self.spec))

    def add_cells(self, cells: dict) -> None:
        """Add a row already encoded with `encode_row` (e.g. in an encode thread)."""
        assert CHECKSUM_COLUMN in cells or not self.spec.row_checksums, "cells come from encode_row"
        self._pending.append(cells)
        self._pending_bytes += _raw_bytes(cells)
        self.rows += 1
        self.tokens += len(cells["input_ids"])
        self.positions += max(len(cells["input_ids"]) - 1, 0)
        if len(self._pending) >= self.batch_rows or self._pending_bytes >= self.batch_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        self._writer.write_batch(build_batch(self._pending, self.schema))
        self._pending = []
        self._pending_bytes = 0

    def close(self) -> ShardEntry:
        self._flush()
        self._writer.close()
        self._sink.close()
        # bytes and sha256 are the published file's, filled in by publish_shard
        entry = ShardEntry(file=self.final_path.name, index=self.index, rows=self.rows, tokens=self.tokens,
                           positions=self.positions, bytes=0, sha256="", row_start=self.row_start,
                           row_end=self.row_end)
        return CacheDir(self.cache_dir).publish_shard(self.tmp_path, entry)

    def abort(self) -> None:
        try:
            self._writer.close()
            self._sink.close()
        except Exception:  # the writer may already be broken; the file goes anyway
            pass
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()


COMPRESSIONS = ("zstd", "lz4", "none")


def buffer_codec(compression: str, zstd_level: int = DEFAULT_ZSTD_LEVEL) -> pa.Codec | None:
    """Arrow IPC buffer compression. zstd is the default; lz4 compresses several
    times faster at a lower ratio and `none` skips it, for hidden-state-heavy
    caches whose single writer thread would otherwise bound the capture (fp8
    hidden states gain only ~1.2x from zstd). Readers handle every codec."""
    if compression == "zstd":
        return pa.Codec("zstd", compression_level=zstd_level)
    if compression == "lz4":
        return pa.Codec("lz4")
    if compression == "none":
        return None
    raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")


def build_batch(rows: list[dict], schema: pa.Schema) -> pa.RecordBatch:
    """Encoded cells -> one record batch, straight from buffers.

    `RecordBatch.from_pydict` converts numpy list cells element by element
    (about 40 ms for one 4096-token row); building offsets and values
    directly costs one copy of the bytes.
    """
    arrays = []
    for f in schema:
        values = [cells.get(f.name) for cells in rows]
        if pa.types.is_binary(f.type) or pa.types.is_list(f.type):
            lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
            offsets = np.zeros(len(values) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            assert offsets[-1] < 2**31, f"record batch column {f.name} exceeds 2 GiB"
            offsets = offsets.astype(np.int32)
            if pa.types.is_binary(f.type):
                # One cell (a production row per batch): Arrow takes its buffer without a copy.
                data = values[0] if len(values) == 1 else b"".join(values)
                arrays.append(pa.Array.from_buffers(f.type, len(values), [None, pa.py_buffer(offsets),
                                                                           pa.py_buffer(data)]))
            else:
                flat = np.concatenate([np.asarray(v, dtype=np.int32) for v in values]) if values else []
                arrays.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=f.type.value_type)))
        elif pa.types.is_fixed_size_list(f.type):  # the row checksums
            flat = pa.array(np.concatenate(values), type=f.type.value_type)
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, f.type.list_size))
        else:
            arrays.append(pa.array(values, type=f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _raw_bytes(cells: dict) -> int:
    size = 0
    for value in cells.values():
        if isinstance(value, (bytes, bytearray)):
            size += len(value)
        elif hasattr(value, "nbytes"):
            size += int(value.nbytes)
    return size

