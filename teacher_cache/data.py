"""Tokenized input for the teacher: rows of `input_ids` (and optional `labels`)
used exactly as given, from an HF `save_to_disk` directory (DatasetDict or
Dataset), Parquet files or Arrow files.

Columns are memory-mapped where the format allows and read with pyarrow
directly; a row is a slice of the column's value buffer. `validate` checks
every selected row (ids inside the vocabulary, length within the teacher's
context, labels matching) with vectorised passes, so bad input is reported
before a model is loaded.

Shape suffixes: R rows, L tokens of one row, F flattened tokens of a chunk.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from common.causal_lm import IGNORE_INDEX
from teacher_cache.backend import SourceRow
from teacher_cache.dataset_columns import DatasetRowColumns, RowColumnsConfig, read_row_columns

INPUT_IDS = "input_ids"
LABELS = "labels"
_DATA_SUFFIXES = (".parquet", ".arrow")
_ARROW_FILE_MAGIC = b"ARROW1"


@dataclass
class _Chunk:
    file: str
    row_start: int  # first row of this chunk in the whole split
    offsets_R1: np.ndarray  # int64 [rows + 1], into values_F
    values_F: np.ndarray


class _ListColumn:
    """A list<int> column spread over files and Arrow chunks, with row access."""

    def __init__(self, name: str, pieces: list[tuple[str, pa.ChunkedArray]]):
        self.name = name
        self.chunks: list[_Chunk] = []
        row = 0
        for file, column in pieces:
            for arr in column.chunks:
                if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)) or \
                        not pa.types.is_integer(arr.type.value_type):
                    raise ValueError(f"{file}: column '{name}' must be a list of integers, got {arr.type}")
                if arr.null_count:
                    bad = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
                    raise ValueError(f"{file}: column '{name}' is null in row {row + bad}")
                if len(arr) == 0:
                    continue
                values = arr.values
                if values.null_count:
                    raise ValueError(f"{file}: column '{name}' holds null ids near row {row}")
                self.chunks.append(_Chunk(file, row, arr.offsets.to_numpy().astype(np.int64),
                                          values.to_numpy(zero_copy_only=False)))
                row += len(arr)
        self.num_rows = row
        self._starts = np.array([c.row_start for c in self.chunks], dtype=np.int64)

    def locate(self, i: int) -> tuple[_Chunk, int]:
        c = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.chunks[c], i - self.chunks[c].row_start

    def get(self, i: int) -> np.ndarray:
        chunk, j = self.locate(i)
        return chunk.values_F[chunk.offsets_R1[j]:chunk.offsets_R1[j + 1]]

    def lengths(self) -> np.ndarray:
        parts = [np.diff(c.offsets_R1) for c in self.chunks]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def file_of(self, i: int) -> str:
        return self.locate(i)[0].file


class SourceData:
    """The (limited) rows of one split. Row ids are indices into the split."""

    def __init__(self, path: str, split: str, input_ids: _ListColumn, labels: _ListColumn | None,
                 limit_rows: int | None, row_columns: DatasetRowColumns | None = None):
        self.path, self.split = path, split
        # The optional per-row columns (id, source, channels) the cache stores.
        self.row_columns = row_columns or DatasetRowColumns()
        self._ids, self._labels = input_ids, labels
        if labels is not None and labels.num_rows != input_ids.num_rows:
            raise ValueError(f"{path}: split '{split}' has {input_ids.num_rows} input_ids rows "
                             f"but {labels.num_rows} labels rows")
        self.total_rows = input_ids.num_rows
        if limit_rows is not None and limit_rows < 0:
            raise ValueError(f"--limit-rows must be >= 0, got {limit_rows}")
        self.num_rows = self.total_rows if limit_rows is None else min(limit_rows, self.total_rows)
        self.lengths_R = input_ids.lengths()[:self.num_rows]

    @property
    def has_labels(self) -> bool:
        return self._labels is not None

    @property
    def num_tokens(self) -> int:
        return int(self.lengths_R.sum())

    def where(self, i: int) -> str:
        return f"{self._ids.file_of(i)}: split '{self.split}', row {i}"

    def row(self, i: int) -> SourceRow:
        assert 0 <= i < self.num_rows, (i, self.num_rows)
        input_ids = self._ids.get(i).astype(np.int32)
        labels = self._labels.get(i).astype(np.int32) if self._labels is not None else input_ids.copy()
        return SourceRow(row_id=i, input_ids=input_ids, labels=labels)

    def rows(self, start: int, end: int) -> list[SourceRow]:
        return [self.row(i) for i in range(start, end)]

    def validate(self, vocab_size: int, max_context: int) -> None:
        """ValueError naming file, split and row for the first row the teacher cannot take."""
        lengths = self.lengths_R
        for bad, why in ((lengths < 1, "is empty"), (lengths > max_context,
                                                        f"is longer than the model context ({max_context})")):
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"{self.where(i)} {why} ({int(lengths[i])} tokens)")
        self._check_values(self._ids, vocab_size, "token id")
        if self._labels is not None:
            label_lengths = self._labels.lengths()[:self.num_rows]
            mismatch = label_lengths != lengths
            if mismatch.any():
                i = int(np.flatnonzero(mismatch)[0])
                raise ValueError(f"{self.where(i)}: labels has {int(label_lengths[i])} tokens, "
                                 f"input_ids {int(lengths[i])}")
            self._check_values(self._labels, vocab_size, "label", also_allowed=IGNORE_INDEX)
        self.row_columns.check(lengths, self.where)

    def _check_values(self, column: _ListColumn, vocab_size: int, what: str, also_allowed: int | None = None) -> None:
        """ValueError naming the first selected value outside [0, vocab_size) (and not `also_allowed`)."""
        for chunk in column.chunks:
            rows_here = min(len(chunk.offsets_R1) - 1, self.num_rows - chunk.row_start)
            if rows_here <= 0:
                break
            lo, hi = chunk.offsets_R1[0], chunk.offsets_R1[rows_here]
            values_F = chunk.values_F[lo:hi]
            bad_F = (values_F < 0) | (values_F >= vocab_size)
            if also_allowed is not None:
                bad_F &= values_F != also_allowed
            if bad_F.any():
                f = int(np.flatnonzero(bad_F)[0]) + lo
                r = int(np.searchsorted(chunk.offsets_R1, f, side="right")) - 1
                rule = "is outside" if also_allowed is None else f"is neither {also_allowed} nor in"
                raise ValueError(f"{self.where(chunk.row_start + r)}: {what} {int(chunk.values_F[f])} at position "
                                 f"{f - int(chunk.offsets_R1[r])} {rule} the teacher vocabulary [0, {vocab_size})")

    def fingerprint(self) -> str:
        """Content hash of the whole split's input_ids and labels (lengths and values),
        so a cache refuses other data whatever its path or limit."""
        h = hashlib.blake2b(digest_size=16)
        for column in (self._ids, self._labels):
            if column is None:
                h.update(b"no-labels")
                continue
            for chunk in column.chunks:
                h.update(np.diff(chunk.offsets_R1).astype("<i8"))
                values_F = chunk.values_F[chunk.offsets_R1[0]:chunk.offsets_R1[-1]]
                # Hashed through the buffer protocol: no copy of memory-mapped int32 ids.
                h.update(np.ascontiguousarray(values_F, dtype="<i4"))
        return h.hexdigest()

    def describe(self) -> dict:
        described = {"path": self.path, "split": self.split, "num_rows": self.total_rows,
                     "has_labels": self.has_labels, "fingerprint": self.fingerprint()}
        columns_fingerprint = self.row_columns.fingerprint()
        if columns_fingerprint is not None:  # only with row columns: other manifests stay as they were
            described["columns_fingerprint"] = columns_fingerprint
        return described


def _read_arrow(file: Path) -> pa.Table:
    """HF writes Arrow IPC streams; plain IPC files (which begin with their magic) work too. Memory-mapped."""
    try:
        source = pa.memory_map(str(file), "r")
        is_file_format = source.read(len(_ARROW_FILE_MAGIC)) == _ARROW_FILE_MAGIC
        source.seek(0)
        return ipc.open_file(source).read_all() if is_file_format else ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, OSError) as exc:  # pyarrow reports a truncated stream as an OSError
        raise ValueError(f"{file}: not an Arrow IPC file or stream ({exc})") from exc


def _read_table(file: Path) -> pa.Table:
    if file.suffix == ".parquet":
        try:
            return pq.read_table(file, memory_map=True)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"{file}: not a readable Parquet file ({exc})") from exc
    return _read_arrow(file)


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expects a JSON object, got {type(value).__name__}")
    return value


def _saved_dataset_files(dataset_dir: Path) -> list[Path]:
    state_path = dataset_dir / "state.json"
    files = _read_json_object(state_path).get("_data_files")
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("filename"), str)
                                              for f in files):
        raise ValueError(f"{state_path}: not a save_to_disk state (key '_data_files' must list "
                         f"{{\"filename\": ...}} objects)")
    return [_file_inside(dataset_dir, f["filename"], state_path) for f in files]


def _file_inside(dataset_dir: Path, name: str, listed_in: Path) -> Path:
    """A data file a state.json names; it must lie in the dataset's directory. The
    file itself may be a link (a hub cache snapshot links its files to blobs), but
    its name may not climb out (`..`, an absolute path) nor pass through a linked folder."""
    path = dataset_dir / name
    root = dataset_dir.resolve()
    if Path(name).is_absolute() or ".." in Path(name).parts or not path.parent.resolve().is_relative_to(root):
        raise ValueError(f"{listed_in}: data file {name!r} lies outside the dataset directory {dataset_dir}")
    return path


def _split_of_file(file: Path, root: Path) -> str:
    """Hub layouts: `<split>/...`, `data/<split>-00000-of-00002.parquet`, `<split>.parquet`."""
    rel = file.relative_to(root)
    if len(rel.parts) > 1 and rel.parts[0] != "data":
        return rel.parts[0]
    return rel.name.split(".")[0].split("-")[0]


def resolve_files(path: Path, split: str) -> list[Path]:
    """The data files holding `split` of the dataset at `path`."""
    if not path.exists():
        raise ValueError(f"data path {path} does not exist")
    if path.is_file():
        if path.suffix not in _DATA_SUFFIXES:
            raise ValueError(f"{path}: unsupported data file (use Parquet, Arrow or a save_to_disk directory)")
        return [path]
    if (path / "dataset_dict.json").is_file():
        splits = _read_json_object(path / "dataset_dict.json").get("splits")
        if not isinstance(splits, list) or not all(isinstance(name, str) for name in splits):
            raise ValueError(f"{path / 'dataset_dict.json'}: key 'splits' must be a list of split names")
        if split not in splits:
            raise ValueError(f"{path}: unknown split '{split}' (splits: {', '.join(splits)})")
        return _saved_dataset_files(path / split)
    if (path / "state.json").is_file():
        recorded = _read_json_object(path / "state.json").get("_split")
        if recorded is not None and recorded != split:
            raise ValueError(f"{path}: unknown split '{split}' (this dataset holds split '{recorded}')")
        return _saved_dataset_files(path)
    files = sorted(p for p in path.rglob("*") if p.suffix in _DATA_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise ValueError(f"{path}: no save_to_disk dataset, Parquet or Arrow files found")
    by_split: dict[str, list[Path]] = {}
    for f in files:
        by_split.setdefault(_split_of_file(f, path), []).append(f)
    if split not in by_split:
        raise ValueError(f"{path}: unknown split '{split}' (splits: {', '.join(sorted(by_split))})")
    return by_split[split]


@dataclass
class SourceConfig:
    """The `data` section of a cache config: which rows the teacher runs over."""

    path: str = field(default="", metadata={"flag": "--data"})  # save_to_disk directory, Parquet or Arrow file(s)
    split: str = field(default="train", metadata={"flag": "--split"})
    limit_rows: int | None = field(default=None, metadata={"flag": "--limit-rows"})  # only the first N rows
    columns: RowColumnsConfig = field(default_factory=RowColumnsConfig)  # the optional per-row columns


def open_source(path: str | Path, split: str, limit_rows: int | None = None,
                columns: RowColumnsConfig | None = None) -> SourceData:
    """Open a split; ValueError naming the file for a missing `input_ids` column.
    `columns`: which optional row columns to read (None: none)."""
    path = Path(path)
    files = resolve_files(path, split)
    ids_pieces, label_pieces, tables = [], [], []
    for f in files:
        if not f.is_file():
            raise ValueError(f"{f}: data file listed by the dataset is missing")
        table = _read_table(f)
        tables.append((str(f), table))
        if INPUT_IDS not in table.column_names:
            raise ValueError(f"{f}: split '{split}' has no '{INPUT_IDS}' column "
                             f"(columns: {', '.join(table.column_names)})")
        ids_pieces.append((str(f), table.column(INPUT_IDS)))
        if LABELS in table.column_names:
            label_pieces.append((str(f), table.column(LABELS)))
    if label_pieces and len(label_pieces) != len(ids_pieces):
        raise ValueError(f"{path}: split '{split}' has a '{LABELS}' column in some files only")
    labels = _ListColumn(LABELS, label_pieces) if label_pieces else None
    row_columns = read_row_columns(tables, columns) if columns is not None else None
    return SourceData(str(path), split, _ListColumn(INPUT_IDS, ids_pieces), labels, limit_rows, row_columns)
