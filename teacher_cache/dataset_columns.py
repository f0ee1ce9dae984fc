"""The dataset's optional per-row columns the cache carries (common.row_columns):
its row `id`, the row's source name and the assistant `spans` from which each
token's channel is derived. Read here, next to the token columns, and attached
to each row on its way to the writer, so no backend sees them.

Shape suffixes: R rows of the split.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from common import row_columns
from common.shard_format import TeacherRow

SPAN_FIELDS = ("assistant_token_start", "analysis_token_count", "final_token_count")
BAD_SPANS = ("error", "unknown")


@dataclass
class RowColumnsConfig:
    """`data.columns` of a cache config: which dataset columns become row columns.
    A column that the dataset does not have is not stored ("" stores none); a name
    other than the default must exist."""

    id: str = "id"  # string column: the dataset's own row id
    # A struct column with a `dataset` field (the phase-1 schema's `source`), or a string column.
    source: str = field(default="source", metadata={"flag": "--source-column"})
    # struct {assistant_token_start, analysis_token_count, final_token_count}: the per-token channels
    spans: str = "spans"
    # spans that do not fit their row: "error" (a ValueError naming the row) or
    # "unknown" (a warning, and every token of such a row gets the channel "unknown")
    bad_spans: str = field(default="error", metadata={"flag": "--bad-spans"})

    def __post_init__(self):
        if self.bad_spans not in BAD_SPANS:
            raise ValueError(f"data.columns.bad_spans must be one of {', '.join(BAD_SPANS)}, got {self.bad_spans!r}")


@dataclass
class DatasetRowColumns:
    """The split's row columns that are present (None where absent)."""

    ids: pa.Array | None = None  # string [R]
    source_codes_R: np.ndarray | None = None  # int32 into source_names; -1 for a null source
    source_names: list[str] = field(default_factory=list)
    spans_R3: np.ndarray | None = None  # int64 [R, 3] (SPAN_FIELDS); -1 where the row has none
    bad_spans: str = "error"
    # rows whose spans do not fit (bad_spans "unknown"): all their tokens are unknown
    unfit_rows: frozenset[int] = frozenset()

    @property
    def names(self) -> tuple[str, ...]:
        """The row columns a cache of this split stores, in schema order."""
        present = {row_columns.DATASET_ID: self.ids is not None, row_columns.SOURCE: self.source_codes_R is not None,
                   row_columns.CHANNELS: self.spans_R3 is not None}
        return tuple(name for name in row_columns.ROW_COLUMNS if present[name])

    def fingerprint(self) -> str | None:
        """Content hash of the present row columns (None when there are none), so a resume
        refuses a dataset whose ids, sources or spans changed while its tokens did not."""
        if not self.names:
            return None
        h = hashlib.blake2b(digest_size=16)
        if self.ids is not None:
            for value in self.ids.to_pylist():
                h.update(value.encode() + b"\0")
        if self.source_codes_R is not None:
            h.update("\0".join(self.source_names).encode() + b"\1")
            h.update(np.ascontiguousarray(self.source_codes_R, dtype="<i4"))
        if self.spans_R3 is not None:
            h.update(np.ascontiguousarray(self.spans_R3, dtype="<i8"))
        h.update(self.bad_spans.encode())
        return h.hexdigest()

    def check(self, lengths_R: np.ndarray, where) -> None:
        """Null ids and sources, and spans that do not fit their row: a ValueError
        naming the first such row (`where(i)`), or for spans with `bad_spans` "unknown"
        a warning (their rows' tokens become channel "unknown")."""
        num_rows = len(lengths_R)
        null_R = {"id": None if self.ids is None else self.ids[:num_rows].is_null().to_numpy(zero_copy_only=False),
                  "source": None if self.source_codes_R is None else self.source_codes_R[:num_rows] < 0}
        for name, is_null_R in null_R.items():
            if is_null_R is not None and is_null_R.any():
                raise ValueError(f"{where(int(np.flatnonzero(is_null_R)[0]))}: the row's {name} is null")
        if self.spans_R3 is None:
            return
        start_R, analysis_R, final_R = self.spans_R3[:num_rows].T
        unfit_R = ~row_columns.spans_fit(lengths_R, start_R, analysis_R, final_R)
        if not unfit_R.any():
            return
        i = int(np.flatnonzero(unfit_R)[0])
        spans = ", ".join(f"{k}={int(v)}" for k, v in zip(SPAN_FIELDS, self.spans_R3[i]))
        why = f"{where(i)}: spans ({spans}) do not fit its {int(lengths_R[i])} tokens"
        if self.bad_spans == "error":
            raise ValueError(f"{why} (set data.columns.bad_spans=unknown to store such rows with channel 'unknown')")
        warnings.warn(f"{why}; {int(unfit_R.sum())} such row(s) get channel 'unknown' on every token", stacklevel=2)
        self.unfit_rows = frozenset(int(r) for r in np.flatnonzero(unfit_R))

    def annotate_all(self, rows: Iterator[TeacherRow]) -> Iterator[TeacherRow]:
        """`rows` with their columns attached; closing this closes `rows` (a backend's generator
        aborts its in-flight work when the writer fails)."""
        try:
            for row in rows:
                yield self.annotate(row)
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()

    def annotate(self, row: TeacherRow) -> TeacherRow:
        """Attach row `row.row_id`'s columns to a teacher row."""
        r = row.row_id
        if self.ids is not None:
            row.dataset_id = self.ids[r].as_py()
        if self.source_codes_R is not None:
            row.source = self.source_names[self.source_codes_R[r]]
        if self.spans_R3 is not None:
            if r in self.unfit_rows:
                row.channels_L = row_columns.unknown_channels(row.num_tokens)
            else:
                row.channels_L = row_columns.channels_from_spans(row.num_tokens, *(int(v) for v in self.spans_R3[r]))
        return row


def read_row_columns(tables: list[tuple[str, pa.Table]], config: RowColumnsConfig) -> DatasetRowColumns:
    """The configured row columns of a split's files (`(file, table)` in row order)."""
    out = DatasetRowColumns(bad_spans=config.bad_spans)
    defaults = RowColumnsConfig()
    ids = _gather(tables, config.id, config.id != defaults.id)
    if ids is not None:
        if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
            raise ValueError(f"{tables[0][0]}: column {config.id!r} (row ids) must be strings, got {ids.type}")
        out.ids = ids
    sources = _gather(tables, config.source, config.source != defaults.source)
    if sources is not None:
        names_R = _source_names(sources, config.source, tables[0][0])
        encoded = pc.dictionary_encode(names_R)
        out.source_names = encoded.dictionary.to_pylist()
        out.source_codes_R = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
    spans = _gather(tables, config.spans, config.spans != defaults.spans)
    if spans is not None:
        out.spans_R3 = _span_array(spans, config.spans, tables[0][0])
    return out


def _gather(tables: list[tuple[str, pa.Table]], name: str, required: bool) -> pa.Array | None:
    """One column over all files as one array; None when no file has it (an error if `required`)."""
    if not name:
        return None
    holding = [file for file, table in tables if name in table.column_names]
    if not holding:
        if required:
            raise ValueError(f"{tables[0][0]}: no column {name!r} (columns: {', '.join(tables[0][1].column_names)})")
        return None
    if len(holding) != len(tables):
        missing = next(file for file, table in tables if name not in table.column_names)
        raise ValueError(f"{missing}: no column {name!r}, which other files of the split have")
    first_file, first_table = tables[0]
    expected = first_table.schema.field(name).type
    for file, table in tables[1:]:
        if table.schema.field(name).type != expected:
            raise ValueError(f"{file}: column {name!r} is {table.schema.field(name).type}, in {first_file} "
                             f"it is {expected}")
    return pa.chunked_array([c for _, table in tables for c in table.column(name).chunks],
                            type=expected).combine_chunks()


def _source_names(column: pa.Array, name: str, file: str) -> pa.Array:
    if pa.types.is_struct(column.type):
        if column.type.get_field_index("dataset") < 0:
            raise ValueError(f"{file}: struct column {name!r} has no 'dataset' field (fields: "
                             f"{', '.join(f.name for f in column.type)})")
        column = pc.struct_field(column, "dataset")
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ValueError(f"{file}: column {name!r} (source) must be strings or a struct with a 'dataset' "
                         f"string, got {column.type}")
    return column


def _span_array(column: pa.Array, name: str, file: str) -> np.ndarray:
    """[R, 3] int64; a null struct or field reads as -1 (which never fits)."""
    if not pa.types.is_struct(column.type) or any(column.type.get_field_index(f) < 0 for f in SPAN_FIELDS):
        raise ValueError(f"{file}: column {name!r} must be a struct with fields {', '.join(SPAN_FIELDS)}, "
                         f"got {column.type}")
    parts = []
    for f in SPAN_FIELDS:
        values = pc.struct_field(column, f)
        if not pa.types.is_integer(values.type):
            raise ValueError(f"{file}: column {name!r} field {f!r} must be integers, got {values.type}")
        parts.append(values.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64))
    return np.stack(parts, axis=1) if parts[0].size else np.zeros((0, 3), dtype=np.int64)
