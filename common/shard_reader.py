"""Shard reader: memory-maps an Arrow IPC shard, decodes only the columns asked
for, compares every row it returns with the row's checksums (format 2 on),
and on request checks the file against its manifest entry (`ShardEntry.check_file`)
and each row's content hash. A cache directory's rows: `CacheDir.read_rows`."""

from __future__ import annotations

import bisect
import itertools
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.ipc as ipc

from common.manifest import ShardEntry
from common.shard_format import (CHECKSUM_COLUMN, ShardFormatError, TeacherRow, check_row_checksums,
                                 checksummed_columns, decode_row, spec_from_schema)
from common.spec import ShardSpec, content_hash


class ShardReader:
    """`verify_checksum`: compare the file's size and sha256 with `entry` on opening.
    `verify_cells`: compare each row's cells with its checksums as rows are read."""

    def __init__(self, path: Path, columns: Sequence[str] | None = None, entry: ShardEntry | None = None,
                 verify_checksum: bool = False, verify_cells: bool = True):
        self.path = Path(path)
        if entry is not None:
            entry.check_file(self.path, sha256=verify_checksum)
        elif not self.path.is_file():
            raise ShardFormatError(f"{self.path}: shard file not found")
        try:
            self._mmap = pa.memory_map(str(self.path), "r")
            full = ipc.open_file(self._mmap)
            self.schema = full.schema
        except (pa.ArrowInvalid, OSError) as exc:
            raise ShardFormatError(f"{self.path}: not a readable Arrow IPC file ({exc})") from exc
        self.spec: ShardSpec = spec_from_schema(self.schema, str(self.path))
        # The columns a row's checksums cover, in their order (None: nothing to check).
        self._checksummed = checksummed_columns(self.spec) if verify_cells and self.spec.row_checksums else None
        names = list(self.schema.names)
        if columns is None:
            self.columns = names
        else:
            unknown = [c for c in columns if c not in names]
            if unknown:
                raise ShardFormatError(f"{self.path}: no column(s) {', '.join(unknown)}")
            checksums = [CHECKSUM_COLUMN] if self._checksummed else []
            self.columns = list(dict.fromkeys(["row_id", *columns, *checksums]))
        options = ipc.IpcReadOptions(included_fields=[names.index(c) for c in self.columns])
        self._reader = ipc.open_file(self._mmap, options=options)
        self.num_batches = self._reader.num_record_batches
        self._batch_ends = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._mmap.close()

    def read_batch(self, i: int) -> pa.RecordBatch:
        try:
            return self._reader.get_batch(i)
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
            raise ShardFormatError(f"{self.path}: record batch {i} unreadable ({exc})") from exc

    @property
    def num_rows(self) -> int:
        ends = self._row_ends()
        return ends[-1] if ends else 0

    def _row_ends(self) -> list[int]:
        """Rows in batches 0..b, for each batch b (counted once; `read_row` bisects it)."""
        if self._batch_ends is None:
            # Count rows through the small row_id column alone: reading the selected columns
            # would decompress the whole shard before its first row is returned.
            options = ipc.IpcReadOptions(included_fields=[self.schema.names.index("row_id")])
            ids_only = ipc.open_file(self._mmap, options=options)
            self._batch_ends = list(itertools.accumulate(ids_only.get_batch(i).num_rows
                                                         for i in range(self.num_batches)))
        return self._batch_ends

    def cells(self, batch: pa.RecordBatch, r: int) -> dict:
        """Row r of one of this shard's record batches as {column: cell}, its checksums verified."""
        cells = row_cells(batch, r)
        if self._checksummed is not None:
            check_row_checksums(cells, self._checksummed, where=f"{self.path}: ")
        return cells

    def iter_cells(self) -> Iterator[dict]:
        for b in range(self.num_batches):
            batch = self.read_batch(b)
            for r in range(batch.num_rows):
                yield self.cells(batch, r)

    def iter_rows(self, verify_content: bool = False) -> Iterator[TeacherRow]:
        for cells in self.iter_cells():
            row = decode_row(cells, self.spec, where=f"{self.path}: ")
            if verify_content:
                check_content_hash(row, self.path)
            yield row

    def read_row(self, index: int, hidden_stored: bool = False) -> TeacherRow:
        """Row by its position in the shard (0-based); `hidden_stored` as in `decode_row`."""
        ends, num_rows = self._row_ends(), self.num_rows
        if not (0 <= index < num_rows):
            raise ValueError(f"{self.path}: row {index} out of range (shard has {num_rows} rows)")
        b = bisect.bisect_right(ends, index)
        first = ends[b - 1] if b else 0
        return decode_row(self.cells(self.read_batch(b), index - first), self.spec, where=f"{self.path}: ",
                          hidden_stored=hidden_stored)


def row_cells(batch: pa.RecordBatch, r: int) -> dict:
    """Row r of a record batch as {column: cell} for `decode_row`. Hidden-state
    cells are zero-copy views of the batch's buffers (megabytes per row: a
    `bytes` copy would hold the GIL that a training loop's thread needs)."""
    return {name: _cell(column, r, zero_copy=name.startswith("hidden_"))
            for name, column in zip(batch.schema.names, batch.columns)}


def _cell(column: pa.Array, r: int, zero_copy: bool = False):
    value = column[r]
    if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
        return value.values.to_numpy(zero_copy_only=False)
    if zero_copy and pa.types.is_binary(column.type) and value.is_valid:
        return value.as_buffer()
    return value.as_py()


def check_content_hash(row: TeacherRow, path: Path) -> None:
    if row.input_ids_L is None or row.content_hash is None:
        return
    if content_hash(row.input_ids_L) != row.content_hash:
        raise ShardFormatError(f"{path}: row {row.row_id}: content hash does not match its input_ids")
