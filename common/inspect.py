"""What a teacher shard or cache holds and whether it is sound.

The logic behind `vpmoe inspect-shard`; the command only formats the report
this module returns (a JSON-ready dict). Two kinds of failure:

* `ShardFormatError`: the input cannot be read as the format says (truncated
  or unreadable file, unknown version, missing column, a manifest that
  disagrees with its shards in spec, size, rows or tokens). Raised at once.
  With `verify=True` a shard whose sha256 differs from the manifest is one
  of these too, checked before anything else is read from it.
* verification problems (`verify=True`): row checksums, content-hash and
  value checks per row, manifest totals, each shard's rows against its
  manifest row range. Collected, each one line naming the file and row.
  Without `verify` the rows read for statistics are checked against their
  checksums too, and a mismatch is a `ShardFormatError`.

Nothing here writes to the cache.

Compressed bytes per column are read from the IPC record-batch metadata: Arrow
compresses each buffer separately and the metadata lists every buffer's
offset and stored length; a compressed buffer starts with its uncompressed
length as int64 (-1 when Arrow kept it uncompressed).

Shape suffixes: L tokens, P positions, K top-k width, T temperatures,
S flattened sampled entries, H stored hidden positions, D hidden size.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from common.causal_lm import IGNORE_INDEX
from common.cache_dir import CacheDir, scan_shard
from common.manifest import MANIFEST_NAME, CacheManifest, ShardEntry, read_sidecar
from common.shard_format import (CHECKSUM_COLUMN, TOKEN_COLUMNS, ShardFormatError, TeacherRow, decode_row,
                                 warn_unchecked_rows)
from common.row_columns import CHANNEL_NAMES, DATASET_ID, ROW_COLUMNS, channel_counts
from common.shard_reader import ShardReader
from common.spec import ShardSpec, content_hash, hidden_positions


@dataclass(frozen=True)
class InspectOptions:
    verify: bool = False
    row: int | None = None  # 0-based row index within PATH (shards in index order)
    dataset_id: str | None = None  # or the row whose dataset id this is (caches with the column)
    stats_rows: int = 256  # rows used for distribution statistics
    max_problems: int = 50  # verification problems kept in the report (all are counted)


# ---------------------------------------------------------------- bytes per column

@dataclass
class ColumnBytes:
    name: str
    compressed: int = 0  # bytes in the file body, with Arrow's 8-byte length prefixes
    uncompressed: int = 0

    @property
    def ratio(self) -> float:
        return self.uncompressed / self.compressed if self.compressed else 0.0


def _fb_field(buf: bytes, table: int, index: int) -> int | None:
    """Position of field `index` of the flatbuffer table at `table`, or None if absent."""
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    vtable_size = struct.unpack_from("<H", buf, vtable)[0]
    if 4 + 2 * index >= vtable_size:
        return None
    offset = struct.unpack_from("<H", buf, vtable + 4 + 2 * index)[0]
    return table + offset if offset else None


def _batch_buffers(metadata: bytes) -> tuple[list[tuple[int, int]], bool]:
    """(offset, length) of every body buffer of an IPC RecordBatch message, and
    whether its buffers are compressed.

    Message: field 2 is the header table; RecordBatch: field 2 is the vector
    of Buffer structs {offset: int64, length: int64}, field 3 the optional
    BodyCompression table (Arrow's Message.fbs).
    """
    root = struct.unpack_from("<I", metadata, 0)[0]
    header_at = _fb_field(metadata, root, 2)
    assert header_at is not None, "record batch message without a header"
    header = header_at + struct.unpack_from("<I", metadata, header_at)[0]
    compressed = _fb_field(metadata, header, 3) is not None
    buffers_at = _fb_field(metadata, header, 2)
    if buffers_at is None:
        return [], compressed
    vector = buffers_at + struct.unpack_from("<I", metadata, buffers_at)[0]
    count = struct.unpack_from("<I", metadata, vector)[0]
    return [struct.unpack_from("<qq", metadata, vector + 4 + 16 * i) for i in range(count)], compressed


def column_bytes(path: Path) -> list[ColumnBytes]:
    """Stored and uncompressed bytes of each top-level column of an IPC file."""
    path = Path(path)
    with pa.memory_map(str(path), "r") as source:
        schema = ipc.open_file(source).schema
        per_field = [len(pa.array([], type=f.type).buffers()) for f in schema]
        owner = [i for i, n in enumerate(per_field) for _ in range(n)]
        out = [ColumnBytes(f.name) for f in schema]
        # The file format is the stream format after an 8-byte magic.
        messages = ipc.MessageReader.open_stream(pa.BufferReader(source.read_buffer().slice(8)))
        try:
            while True:
                try:
                    message = messages.read_next_message()
                except StopIteration:
                    break
                if message.type != "record batch":
                    continue
                body = message.body
                buffers, compressed = _batch_buffers(message.metadata.to_pybytes())
                if len(buffers) != len(owner):
                    raise ShardFormatError(f"{path}: record batch has {len(buffers)} buffers, schema needs {len(owner)}")
                for (offset, length), field_index in zip(buffers, owner):
                    if length == 0:
                        continue
                    stored = out[field_index]
                    stored.compressed += length
                    if not compressed:  # --compression none: buffers are stored as they are
                        stored.uncompressed += length
                        continue
                    # Each compressed buffer starts with its uncompressed length (-1: stored as is).
                    prefix = struct.unpack_from("<q", body.slice(offset, 8).to_pybytes())[0]
                    stored.uncompressed += length - 8 if prefix == -1 else prefix
        except (pa.ArrowInvalid, struct.error) as exc:
            raise ShardFormatError(f"{path}: IPC message metadata unreadable ({exc})") from exc
    return out


# ---------------------------------------------------------------- row checks

def check_row(row: TeacherRow, spec: ShardSpec, where: str) -> list[str]:
    """Every format rule one decoded row can break; one line each, naming the row."""
    at = f"{where}row {row.row_id}"
    problems = []
    input_ids_L = row.input_ids_L
    length = len(input_ids_L)
    num_pos = max(length - 1, 0)
    if row.content_hash is not None and content_hash(input_ids_L) != row.content_hash:
        problems.append(f"{at}: content hash does not match its input_ids")
    if row.labels_L is not None and len(row.labels_L) != length:
        problems.append(f"{at}: {len(row.labels_L)} labels for {length} tokens")
    if length and (input_ids_L.min() < 0 or input_ids_L.max() >= spec.vocab_size):
        problems.append(f"{at}: input id outside [0, {spec.vocab_size})")
    problems += spec.targets.kind.check_row(row, spec, at, num_pos)
    problems += _check_hidden(row, spec, at, length)
    return problems


def _check_hidden(row: TeacherRow, spec: ShardSpec, at: str, length: int) -> list[str]:
    hspec = spec.hidden
    if not hspec.layers or not row.hidden:
        return []
    problems = []
    expected_H = hidden_positions(row.row_id, length, hspec.token_fraction, hspec.seed)
    if not np.array_equal(row.hidden_positions_H, expected_H):
        problems.append(f"{at}: hidden positions are not the deterministic subset for row {row.row_id}")
    for layer, hidden_HD in row.hidden.items():
        if tuple(hidden_HD.shape) != (len(row.hidden_positions_H), hspec.hidden_size):
            problems.append(f"{at}: hidden layer {layer} has shape {tuple(hidden_HD.shape)}")
        elif not bool(hidden_HD.isfinite().all()):
            problems.append(f"{at}: NaN or Inf in hidden layer {layer}")
    return problems


# ---------------------------------------------------------------- statistics

class DistributionStats:
    """Per-position teacher statistics over the rows it is given."""

    def __init__(self, spec: ShardSpec):
        self.spec = spec
        temps = spec.targets.temperatures
        # Stats describe the T=1 distribution when it is stored.
        self.t_index = temps.index(1.0) if 1.0 in temps else 0
        self.rows = 0
        self.values: dict[str, list[np.ndarray]] = {}  # per-position values, summarised
        self.flags: dict[str, list[np.ndarray]] = {}  # per-position booleans, reported as fractions
        self.hidden_norms: dict[int, list[np.ndarray]] = {}
        self.hidden_max_abs: dict[int, float] = {}

    def add_values(self, name: str, values: np.ndarray) -> None:
        self.values.setdefault(name, []).append(np.asarray(values, dtype=np.float64))

    def add_flags(self, name: str, flags: np.ndarray) -> None:
        self.flags.setdefault(name, []).append(np.asarray(flags, dtype=bool))

    def add(self, row: TeacherRow) -> None:
        self.rows += 1
        next_ids_P = row.input_ids_L[1:].astype(np.int64)
        if row.labels_L is not None:
            self.add_flags("trained_position", row.labels_L[1:] != IGNORE_INDEX)
        self.spec.targets.kind.add_statistics(self, row, self.spec, next_ids_P)
        for layer, hidden_HD in row.hidden.items():
            self.hidden_norms.setdefault(layer, []).append(hidden_HD.float().norm(dim=-1).numpy())
            if hidden_HD.numel():
                max_abs = float(hidden_HD.abs().max())
                self.hidden_max_abs[layer] = max(self.hidden_max_abs.get(layer, 0.0), max_abs)

    def report(self) -> dict:
        out = {"rows": self.rows, "temperature": self.spec.targets.kind.stats_temperature(self.spec, self.t_index)}
        for name, parts in self.values.items():
            out[name] = summarize(np.concatenate(parts))
        for name, parts in self.flags.items():
            flags = np.concatenate(parts)
            out[name + "_fraction"] = float(flags.mean()) if len(flags) else None
        out["hidden"] = {str(layer): {"norm": summarize(np.concatenate(parts)),
                                      "max_abs": self.hidden_max_abs.get(layer, 0.0)}
                         for layer, parts in self.hidden_norms.items()}
        return out


def summarize(values: np.ndarray) -> dict:
    if not len(values):
        return {"count": 0}
    p05, p50, p95 = np.percentile(values, [5, 50, 95])
    return {"count": int(len(values)), "mean": float(values.mean()), "p05": float(p05), "p50": float(p50),
            "p95": float(p95)}


# ---------------------------------------------------------------- one row

def row_report(row: TeacherRow, spec: ShardSpec, decode_token: Callable[[int], str] | None = None) -> dict:
    """One row with its decoded targets: position t describes token t + 1."""
    out = {
        "row_id": row.row_id,
        "content_hash": row.content_hash.hex() if row.content_hash else None,
        "num_tokens": row.num_tokens,
        "input_ids": row.input_ids_L.tolist(),
        "labels": row.labels_L.tolist(),
    }
    if row.dataset_id is not None:
        out["dataset_id"] = row.dataset_id
    if row.source is not None:
        out["source"] = row.source
    if row.channels_L is not None:
        out["channel_counts"] = channel_counts(row.channels_L)
        out["channels"] = [CHANNEL_NAMES[c] for c in row.channels_L]
    if decode_token is not None:
        out["tokens"] = [decode_token(int(i)) for i in row.input_ids_L]
    positions = []
    for t, targets in enumerate(spec.targets.kind.position_entries(row, spec)):
        entry = {"t": t, "next_token": int(row.input_ids_L[t + 1]), "next_label": int(row.labels_L[t + 1]),
                 **targets}
        if decode_token is not None:
            entry["id_tokens"] = [decode_token(i) for i in entry["ids"]]
        positions.append(entry)
    out["positions"] = positions
    if row.hidden:
        out["hidden"] = {"positions": row.hidden_positions_H.tolist(),
                         "norms": {str(layer): h.float().norm(dim=-1).tolist() for layer, h in row.hidden.items()}}
    return out


def load_token_decoder(path: Path) -> Callable[[int], str]:
    """id -> text from a tokenizer.json or a directory holding one."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{file}: no tokenizer.json")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises its own exception type
        raise ValueError(f"{file}: not a tokenizer file ({exc})") from exc
    return lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False)


# ---------------------------------------------------------------- the whole path

@dataclass
class _Shard:
    path: Path
    entry: ShardEntry | None
    spec: ShardSpec
    schema: pa.Schema
    file_bytes: int
    rows: int
    tokens: int
    positions: int
    num_batches: int
    columns: list[ColumnBytes]
    row_ids: np.ndarray  # in file order


def _locate(path: Path) -> tuple[str, CacheManifest | None, dict | None, list[tuple[Path, ShardEntry | None]]]:
    """(kind, manifest, raw manifest JSON, [(shard path, its entry)])."""
    if path.is_dir():
        cache = CacheDir(path)
        manifest = cache.manifest()
        return "cache", manifest, cache.manifest_json(), cache.shard_files(manifest)
    if not path.is_file():
        raise ShardFormatError(f"{path}: no such shard file or cache directory")
    manifest = raw = None
    entry = None
    sidecar = path.with_name(path.name + ".json")
    if sidecar.is_file():
        entry = read_sidecar(sidecar)
    parent = CacheDir(path.parent)
    if parent.has_manifest():
        manifest, raw = parent.manifest(), parent.manifest_json()
        if entry is None:
            entry = next((e for e in manifest.shards if e.file == path.name), None)
    return "shard", manifest, raw, [(path, entry)]


def _open_shard(path: Path, entry: ShardEntry | None, manifest: CacheManifest | None, verify: bool) -> _Shard:
    # The checksum comes first: a changed file is named as such, whatever else breaks.
    scan = scan_shard(path, entry, manifest.spec if manifest is not None else None, verify_sha256=verify)
    if entry is not None:
        for name in ("rows", "tokens", "positions"):
            held = getattr(scan, name)
            if getattr(entry, name) != held:
                raise ShardFormatError(f"{path}: manifest says {getattr(entry, name)} {name}, the shard holds {held}")
    return _Shard(path, entry, scan.spec, scan.schema, path.stat().st_size, scan.rows, scan.tokens, scan.positions,
                  scan.num_batches, column_bytes(path), scan.row_id_R)


def inspect_path(path: Path, options: InspectOptions = InspectOptions(),
                 decode_token: Callable[[int], str] | None = None) -> dict:
    """Report on a shard file or a cache directory (see the module docstring)."""
    path = Path(path)
    kind, manifest, raw_manifest, located = _locate(path)
    shards = [_open_shard(p, e, manifest, options.verify) for p, e in located]
    if not shards:
        raise ShardFormatError(f"{path / MANIFEST_NAME}: the manifest lists no shards")
    spec = shards[0].spec
    for shard in shards[1:]:
        if shard.spec != spec:
            raise ShardFormatError(f"{shard.path}: shard spec differs from {shards[0].path.name}'s")
    warn_unchecked_rows(spec, str(path))

    report = {"path": str(path), "kind": kind, "format_version": spec.format_version,
              "row_checksums": spec.row_checksums, "spec": spec.to_dict()}
    if manifest is not None:
        report["manifest"] = {key: raw_manifest.get(key) for key in ("teacher", "tokenizer", "source", "work", "totals")}
        if manifest.dense_head is not None:  # `kl_mode: dense` can rebuild every logit from the last layer
            report["dense_head"] = manifest.dense_head.to_dict()
    report["schema"] = [{"name": f.name, "type": str(f.type)} for f in shards[0].schema]
    report["shards"] = [{"file": s.path.name, "rows": s.rows, "tokens": s.tokens, "positions": s.positions,
                         "bytes": s.file_bytes, "batches": s.num_batches} for s in shards]
    tokens = sum(s.tokens for s in shards)
    columns, totals = _bytes_report(shards, tokens)
    report["totals"] = {"rows": sum(s.rows for s in shards), "tokens": tokens,
                        "positions": sum(s.positions for s in shards), **totals}
    report["columns"] = columns

    problems: list[str] = []
    if options.verify:
        problems += _verify_totals(shards, raw_manifest, path) if kind == "cache" else []
        problems += _verify_row_ranges(shards, path)
    stats = DistributionStats(spec)
    for shard in shards:
        if not options.verify and stats.rows >= options.stats_rows:
            break
        problems += _scan_shard(shard, options, stats)
    report["stats"] = stats.report()
    if options.verify:
        report["verify"] = {"ok": not problems, "rows_checked": report["totals"]["rows"], "num_problems": len(problems),
                            "problems": problems[:options.max_problems]}
    if options.row is not None and options.dataset_id is not None:
        raise ValueError("give --row or --id, not both")
    index = options.row if options.dataset_id is None else _index_of_dataset_id(shards, options.dataset_id, path)
    if index is not None:
        shard, row = _find_row(shards, index, path)
        report["row"] = {"index": index, "shard": shard.path.name, **row_report(row, spec, decode_token)}
    return report


def _bytes_report(shards: list[_Shard], tokens: int) -> tuple[list[dict], dict]:
    """Per-column bytes and the file totals per token (schema, footer and batch metadata are overhead)."""
    merged: dict[str, ColumnBytes] = {}
    for shard in shards:
        for c in shard.columns:
            m = merged.setdefault(c.name, ColumnBytes(c.name))
            m.compressed += c.compressed
            m.uncompressed += c.uncompressed
    per_token = (lambda n: n / tokens) if tokens else (lambda n: 0.0)
    file_bytes = sum(s.file_bytes for s in shards)
    columns = [{"name": c.name, "compressed_bytes": c.compressed, "uncompressed_bytes": c.uncompressed,
                "ratio": c.ratio, "compressed_per_token": per_token(c.compressed),
                "uncompressed_per_token": per_token(c.uncompressed)} for c in merged.values()]
    targets = [c for c in merged.values()
               if c.name not in (*TOKEN_COLUMNS, *ROW_COLUMNS, CHECKSUM_COLUMN) and not c.name.startswith("hidden")]
    hidden = [c for c in merged.values() if c.name.startswith("hidden")]
    row_columns = [c for c in merged.values() if c.name in ROW_COLUMNS]
    return columns, {
        "file_bytes": file_bytes,
        "overhead_bytes": file_bytes - sum(c.compressed for c in merged.values()),
        "bytes_per_token": per_token(file_bytes),
        "target_bytes_per_token": per_token(sum(c.compressed for c in targets)),
        "hidden_bytes_per_token": per_token(sum(c.compressed for c in hidden)),
        "row_column_bytes_per_token": per_token(sum(c.compressed for c in row_columns)),
    }


def _verify_totals(shards: list[_Shard], raw_manifest: dict, path: Path) -> list[str]:
    totals = raw_manifest.get("totals") or {}
    held = {"rows": sum(s.rows for s in shards), "tokens": sum(s.tokens for s in shards),
            "bytes": sum(s.file_bytes for s in shards)}
    return [f"{path / MANIFEST_NAME}: totals.{key} is {totals[key]}, the shards hold {value}"
            for key, value in held.items() if key in totals and totals[key] != value]


def _verify_row_ranges(shards: list[_Shard], path: Path) -> list[str]:
    """Each shard holds the source rows [row_start, row_end) of its manifest
    entry, in order, and no two entries claim a row."""
    problems = []
    for shard in shards:
        entry, row_ids = shard.entry, shard.row_ids
        if entry is None:
            continue
        expected = np.arange(entry.row_start, entry.row_end, dtype=np.int64)
        claim = f"its manifest range [{entry.row_start}, {entry.row_end})"
        if len(expected) != len(row_ids):
            problems.append(f"{shard.path}: holds {len(row_ids)} rows, {claim} has {len(expected)}")
        elif (expected != row_ids).any():
            i = int(np.argmax(expected != row_ids))
            problems.append(f"{shard.path}: row {row_ids[i]} is the shard's row {i}, where {claim} "
                            f"puts row {expected[i]}")
    entries = sorted((s.entry for s in shards if s.entry is not None), key=lambda e: e.row_start)
    for before, after in itertools.pairwise(entries):
        if after.row_start < before.row_end:
            problems.append(f"{path}: {before.file} [{before.row_start}, {before.row_end}) and {after.file} "
                            f"[{after.row_start}, {after.row_end}) overlap")
    return problems


def _scan_shard(shard: _Shard, options: InspectOptions, stats: DistributionStats) -> list[str]:
    """Row checks (when verifying) and statistics for one shard. A row that does
    not decode or match its checksums is a problem when verifying, else an error."""
    problems = []
    where = f"{shard.path}: "
    with ShardReader(shard.path) as reader:
        for b in range(reader.num_batches):
            if not options.verify and stats.rows >= options.stats_rows:
                break
            try:
                batch = reader.read_batch(b)
                if options.verify:
                    batch.validate(full=True)
            except (ShardFormatError, pa.ArrowException) as exc:
                problems.append(f"{where}record batch {b} unreadable ({' '.join(str(exc).split())})")
                break
            for r in range(batch.num_rows):
                try:
                    row = decode_row(reader.cells(batch, r), shard.spec, where=where)
                except ValueError as exc:
                    if not options.verify:
                        raise
                    problems.append(str(exc))
                    continue
                if options.verify:
                    problems += check_row(row, shard.spec, where)
                if stats.rows < options.stats_rows:
                    stats.add(row)
    return problems


def _index_of_dataset_id(shards: list[_Shard], dataset_id: str, path: Path) -> int:
    """The row's index within PATH (as `--row` counts) whose dataset id is `dataset_id`;
    reads the dataset_id column alone."""
    if DATASET_ID not in shards[0].spec.columns:
        raise ValueError(f"{path}: the cache stores no dataset ids (its dataset had no id column)")
    before = 0
    for shard in shards:
        with ShardReader(shard.path, columns=[DATASET_ID]) as reader:
            for cells in reader.iter_cells():
                if cells[DATASET_ID] == dataset_id:
                    return before
                before += 1
    raise ValueError(f"{path}: no row has dataset id {dataset_id!r}")


def _find_row(shards: list[_Shard], index: int, path: Path) -> tuple[_Shard, TeacherRow]:
    total = sum(s.rows for s in shards)
    if not (0 <= index < total):
        raise ValueError(f"{path}: row {index} out of range ({total} rows)")
    for shard in shards:
        if index < shard.rows:
            with ShardReader(shard.path) as reader:
                return shard, reader.read_row(index)
        index -= shard.rows
    raise AssertionError("unreachable")
