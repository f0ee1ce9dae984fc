"""Shard format v2: one Arrow row per source sequence (see docs/FORMAT.md).

`TeacherRow` is the decoded, in-memory form both stages use; `encode_row` and
`decode_row` map it to and from the Arrow cells. Every row carries a CRC-32 of
each of its other cells (`checksums`), which readers compare on every read:
a byte that changes after writing stops the reader naming file, row and
column, even where zstd still decodes the buffer. Shape suffixes: L tokens,
P = L - 1 target positions (position t describes token t + 1), H stored hidden
positions, D hidden size (the targets' own in common/targets/).
"""

from __future__ import annotations

import functools
import json
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from common import codec, row_columns
from common.spec import READABLE_FORMAT_VERSIONS, ShardSpec, content_hash
from common.targets import RowTargets

SCHEMA_METADATA_KEY = b"vpmoe.shard_spec"
# Columns every shard has, whatever its targets and hidden states.
TOKEN_COLUMNS = ("row_id", "content_hash", "input_ids", "labels")
# Last column (format 2 on): a CRC-32 of each other cell of the row, in schema order.
CHECKSUM_COLUMN = "checksums"


class ShardFormatError(ValueError):
    """A shard or manifest is not what the format says; names the file/row/key."""


@dataclass
class TeacherRow:
    row_id: int
    input_ids_L: np.ndarray
    labels_L: np.ndarray
    # the target kind's RowTargets (common.targets), e.g. TopkRowTargets; None when not read
    targets: RowTargets | None = None
    # hidden states: layer -> [H, D] (float32 after decode), at hidden_positions_H
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden_positions_H: np.ndarray | None = None
    # fp8 caches: per-token scales of hidden states that arrive already quantized
    hidden_scales: dict[int, np.ndarray] = field(default_factory=dict)
    content_hash: bytes | None = None
    # Optional row columns (common.row_columns), stored when the spec lists them
    dataset_id: str | None = None  # the dataset's own id of the row
    source: str | None = None  # the source (sub-dataset) the row comes from
    channels_L: np.ndarray | None = None  # uint8 channel code of each token

    @property
    def num_tokens(self) -> int:
        return int(len(self.input_ids_L))

    @property
    def num_positions(self) -> int:
        return max(self.num_tokens - 1, 0)


def hidden_column(layer: int) -> str:
    return f"hidden_{layer}"


def hidden_scale_column(layer: int) -> str:
    return f"hidden_{layer}_scale"


def build_schema(spec: ShardSpec) -> pa.Schema:
    fields = [
        pa.field("row_id", pa.int64()),
        pa.field("content_hash", pa.binary(16)),
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("labels", pa.list_(pa.int32())),
    ]
    fields += row_columns.schema_fields(spec.columns)
    fields += spec.targets.kind.schema_fields()
    if spec.hidden.layers:
        if spec.hidden.subset:
            fields.append(pa.field("hidden_positions", pa.list_(pa.int32())))
        for layer in spec.hidden.layers:
            fields.append(pa.field(hidden_column(layer), pa.binary()))
            if spec.hidden.dtype == "fp8":
                fields.append(pa.field(hidden_scale_column(layer), pa.binary()))
    if spec.row_checksums:
        fields.append(pa.field(CHECKSUM_COLUMN, pa.list_(pa.uint32(), len(fields))))
    metadata = {SCHEMA_METADATA_KEY: json.dumps(spec.to_dict(), sort_keys=True).encode()}
    return pa.schema(fields, metadata=metadata)


def read_columns(spec: ShardSpec, hidden_layers=(), content_hash: bool = True) -> list[str]:
    """The columns a reader needs for tokens, targets, channels and the given hidden layers
    (`ShardReader` adds `row_id` and the checksums itself). The per-row id and source strings are
    left out: training reads sources once, at start (student_train/loader.py)."""
    wanted_hidden = {hidden_column(layer) for layer in hidden_layers}
    wanted_hidden |= {hidden_scale_column(layer) for layer in hidden_layers}
    if hidden_layers:
        wanted_hidden.add("hidden_positions")
    return [name for name in checksummed_columns(spec)
            if name not in ("row_id", row_columns.DATASET_ID, row_columns.SOURCE)
            and (content_hash or name != "content_hash")
            and (not name.startswith("hidden_") or name in wanted_hidden)]


@functools.lru_cache(maxsize=32)
def checksummed_columns(spec: ShardSpec) -> tuple[str, ...]:
    """Every column but the checksums, in schema order: entry i of a row's
    checksums is the CRC-32 of its cell in column i. Cached: the encode threads
    ask for every row."""
    return tuple(name for name in build_schema(spec).names if name != CHECKSUM_COLUMN)


def cell_checksum(cell) -> int:
    """CRC-32 of a cell's bytes: row_id as int64 little-endian, list cells as
    their little-endian int32 values, string cells as UTF-8, binary cells as stored.
    zlib's CRC-32 runs at several GB/s and releases the GIL on large cells (decode threads)."""
    if isinstance(cell, int):
        return zlib.crc32(cell.to_bytes(8, "little", signed=True))
    if isinstance(cell, str):
        return zlib.crc32(cell.encode("utf-8"))
    if isinstance(cell, np.ndarray):
        cell = np.ascontiguousarray(cell)
    return zlib.crc32(cell)


def row_checksums(cells: dict, columns: Sequence[str]) -> np.ndarray:
    return np.array([cell_checksum(cells[name]) for name in columns], dtype=np.uint32)


def warn_unchecked_rows(spec: ShardSpec, where: str) -> None:
    """One warning per cache (not per shard) that predates row checksums."""
    if not spec.row_checksums:
        warnings.warn(f"{where}: format {spec.format_version} cache: rows carry no checksums, so a changed byte "
                      "inside a shard is not detected (write the cache again to add them)", stacklevel=2)


def check_row_checksums(cells: dict, columns: Sequence[str], where: str = "") -> None:
    """Raise naming the row and column(s) whose cells differ from the checksums
    stored with them; `cells` may hold any subset of `columns`."""
    stored = cells[CHECKSUM_COLUMN]
    bad = [name for i, name in enumerate(columns) if name in cells and cell_checksum(cells[name]) != stored[i]]
    if bad:
        row_id = cells.get("row_id", "?")
        raise ShardFormatError(f"{where}row {row_id}: checksum mismatch in column(s) {', '.join(bad)} "
                               "(the shard changed after it was written)")


def spec_from_schema(schema: pa.Schema, where: str) -> ShardSpec:
    raw = (schema.metadata or {}).get(SCHEMA_METADATA_KEY)
    if raw is None:
        raise ShardFormatError(f"{where}: no {SCHEMA_METADATA_KEY.decode()} in schema metadata; not a vpmoe shard")
    try:
        spec_dict = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ShardFormatError(f"{where}: shard spec metadata is not JSON: {exc}") from exc
    version = spec_dict.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise ShardFormatError(f"{where}: unknown shard format version {version!r} (this build reads "
                               f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))})")
    try:
        spec = ShardSpec.from_dict(spec_dict)
    except ValueError as exc:
        raise ShardFormatError(f"{where}: {exc}") from exc
    expected = build_schema(spec)
    missing = [f.name for f in expected if f.name not in schema.names]
    if missing:
        raise ShardFormatError(f"{where}: missing column(s) {', '.join(missing)}")
    mistyped = [f"{f.name} is {schema.field(f.name).type}, expected {f.type}" for f in expected
                if schema.field(f.name).type != f.type]
    if mistyped:
        raise ShardFormatError(f"{where}: column {'; column '.join(mistyped)}")
    return spec


def encode_row(row: TeacherRow, spec: ShardSpec) -> dict:
    """TeacherRow -> {column: cell}. Validates shapes and ids (names the row).
    Hidden cells are uint8 arrays that may be views of the row's own tensors
    (fp8 ones are): a backend hands rows over and does not write into them again
    (the checksums taken here would name such a write when the row is read)."""
    where = f"row {row.row_id}"
    input_ids = np.asarray(row.input_ids_L, dtype=np.int32)
    labels = np.asarray(row.labels_L, dtype=np.int32)
    if input_ids.ndim != 1 or labels.shape != input_ids.shape:
        raise ValueError(f"{where}: input_ids and labels must be 1-D of equal length")
    cells = {
        "row_id": int(row.row_id),
        "content_hash": content_hash(input_ids),
        "input_ids": input_ids,
        "labels": labels,
    }
    cells.update(_encode_row_columns(row, spec.columns, len(input_ids), where))
    cells.update(spec.targets.kind.encode(row, spec, where))
    hspec = spec.hidden
    if hspec.layers:
        positions = row.hidden_positions_H
        if hspec.subset:
            if positions is None:
                raise ValueError(f"{where}: hidden token fraction < 1 needs hidden_positions")
            cells["hidden_positions"] = np.asarray(positions, dtype=np.int32)
        expected_rows = len(positions) if hspec.subset else len(input_ids)
        for layer in hspec.layers:
            if layer not in row.hidden:
                raise ValueError(f"{where}: hidden layer {layer} missing")
            h_HD = torch.as_tensor(row.hidden[layer])
            if tuple(h_HD.shape) != (expected_rows, hspec.hidden_size):
                raise ValueError(f"{where}: hidden layer {layer} is {tuple(h_HD.shape)}, expected ({expected_rows}, {hspec.hidden_size})")
            if hspec.dtype == "bf16":
                cells[hidden_column(layer)] = codec.encode_hidden_bf16(h_HD)
            else:
                blob, scale_H = codec.encode_hidden_fp8(h_HD, row.hidden_scales.get(layer))
                cells[hidden_column(layer)] = blob
                cells[hidden_scale_column(layer)] = codec.encode_float32(scale_H)
    if spec.row_checksums:
        # Here, in the encode threads, not in the shard's single writer thread.
        cells[CHECKSUM_COLUMN] = row_checksums(cells, checksummed_columns(spec))
    return cells


def _encode_row_columns(row: TeacherRow, columns: tuple[str, ...], num_tokens: int, where: str) -> dict:
    cells = {}
    for name, value in ((row_columns.DATASET_ID, row.dataset_id), (row_columns.SOURCE, row.source)):
        if name in columns:
            if not isinstance(value, str):
                raise ValueError(f"{where}: the cache stores {name} per row, this row has {value!r}")
            cells[name] = value
    if row_columns.CHANNELS in columns:
        if row.channels_L is None:
            raise ValueError(f"{where}: the cache stores channels per row, this row has none")
        cells[row_columns.CHANNELS] = row_columns.encode_channels(row.channels_L, num_tokens, where)
    return cells


def decode_row(cells: dict, spec: ShardSpec, where: str = "", hidden_stored: bool = False) -> TeacherRow:
    """{column: cell} (as returned by the reader) -> TeacherRow.

    Only the columns present in `cells` are decoded; the rest stay None.
    Hidden states are float32 tensors, or with `hidden_stored` in their stored
    form: bf16 tensors, or fp8 bytes as read-only uint8 numpy views of the
    cell with their scales in `hidden_scales`.
    """
    row_id = int(cells["row_id"]) if "row_id" in cells else -1
    where = f"{where}row {row_id}"
    input_ids = np.asarray(cells["input_ids"], dtype=np.int32) if "input_ids" in cells else None
    row = TeacherRow(
        row_id=row_id,
        input_ids_L=input_ids,
        labels_L=np.asarray(cells["labels"], dtype=np.int32) if "labels" in cells else None,
        content_hash=cells.get("content_hash"),
    )
    try:
        row.dataset_id = cells.get(row_columns.DATASET_ID)
        row.source = cells.get(row_columns.SOURCE)
        if row_columns.CHANNELS in cells:
            row.channels_L = row_columns.decode_channels(cells[row_columns.CHANNELS], row.num_tokens
                                                         if input_ids is not None else None, where)
        spec.targets.kind.decode(cells, spec, row)
        hspec = spec.hidden
        if hspec.layers and any(hidden_column(layer) in cells for layer in hspec.layers):
            if hspec.subset:
                positions = np.asarray(cells["hidden_positions"], dtype=np.int32)
            else:
                assert input_ids is not None, "full-fraction hidden states need input_ids to know their length"
                positions = np.arange(len(input_ids), dtype=np.int32)
            row.hidden_positions_H = positions
            for layer in hspec.layers:
                blob = cells.get(hidden_column(layer))
                if blob is None:
                    continue
                if hspec.dtype == "bf16":
                    bf16_HD = codec.decode_hidden_bf16(blob, len(positions), hspec.hidden_size)
                    row.hidden[layer] = bf16_HD if hidden_stored else bf16_HD.float()
                else:
                    scale_H = codec.decode_float32(cells[hidden_scale_column(layer)], len(positions))
                    if hidden_stored:
                        row.hidden[layer] = codec.decode_hidden_fp8_bytes(blob, len(positions), hspec.hidden_size)
                        row.hidden_scales[layer] = scale_H
                    else:
                        row.hidden[layer] = codec.decode_hidden_fp8(blob, scale_H, len(positions), hspec.hidden_size)
    except ValueError as exc:
        raise ShardFormatError(f"{where}: {exc}") from exc
    return row
