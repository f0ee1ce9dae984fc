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
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from common import codec
from common.causal_lm import IGNORE_INDEX
from common.manifest import MANIFEST_NAME, CacheManifest, ShardEntry, load_manifest, read_sidecar, resolve_inside
from common.shard_format import (CHECKSUM_COLUMN, TOKEN_COLUMNS, ShardFormatError, TeacherRow, decode_row,
                                 warn_unchecked_rows)
from common.shard_reader import ShardReader
from common.spec import ShardSpec, content_hash, hidden_positions

# float32 rounding allowance for log-sum-exp comparisons (relative).
LSE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class InspectOptions:
    verify: bool = False
    row: int | None = None  # 0-based row index within PATH (shards in index order)
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
    if spec.targets.mode == "topk":
        problems += _check_topk(row, spec, at, num_pos)
    else:
        problems += _check_sampled(row, spec, at, num_pos)
    problems += _check_hidden(row, spec, at, length)
    return problems


def _check_topk(row: TeacherRow, spec: ShardSpec, at: str, num_pos: int) -> list[str]:
    ids_PK, logits_PK, lse_PT = row.topk_ids_PK, row.topk_logits_PK, row.lse_PT
    if ids_PK.shape[0] != num_pos:
        return [f"{at}: {ids_PK.shape[0]} target positions for {num_pos + 1} tokens"]
    problems = []
    if ids_PK.size and (ids_PK.min() < 0 or ids_PK.max() >= spec.vocab_size):
        p = int(np.argmax((ids_PK < 0).any(1) | (ids_PK >= spec.vocab_size).any(1)))
        problems.append(f"{at}: position {p}: top-k id outside [0, {spec.vocab_size})")
    if ids_PK.shape[1] > 1 and not (np.diff(ids_PK, axis=1) > 0).all():
        p = int(np.argmax(~(np.diff(ids_PK, axis=1) > 0).all(1)))
        problems.append(f"{at}: position {p}: repeated top-k id")
    bad_P = ~np.isfinite(logits_PK).all(1) | ~np.isfinite(lse_PT).all(1)
    if bad_P.any():
        problems.append(f"{at}: position {int(np.argmax(bad_P))}: NaN or Inf in top-k logits or lse")
        return problems
    if not num_pos:
        return problems
    max_P = logits_PK.max(axis=1).astype(np.float64)
    # Smallest true logits consistent with the stored codes: their
    # log-sum-exp is a floor the full-vocabulary lse can never be under.
    gap_hi_PK = codec.gap_upper_bound(max_P[:, None] - logits_PK, spec.targets.value_scale)
    for ti, temperature in enumerate(spec.targets.temperatures):
        lse_P = lse_PT[:, ti].astype(np.float64)
        tol_P = LSE_TOLERANCE * np.maximum(1.0, np.abs(lse_P))
        below_max = lse_P < max_P / temperature - tol_P
        if below_max.any():
            p = int(np.argmax(below_max))
            problems.append(f"{at}: position {p}: lse at T={temperature} ({lse_P[p]:.6g}) is below "
                            f"max logit / T ({max_P[p] / temperature:.6g})")
            continue
        with np.errstate(over="ignore"):
            floor_PK = (max_P[:, None] - gap_hi_PK) / temperature
            kept_lse_P = np.logaddexp.reduce(floor_PK, axis=1)
        below_kept = lse_P < kept_lse_P - tol_P
        if below_kept.any():
            p = int(np.argmax(below_kept))
            problems.append(f"{at}: position {p}: lse at T={temperature} ({lse_P[p]:.6g}) is below the "
                            f"log-sum-exp of its own top-k ({kept_lse_P[p]:.6g})")
    return problems


def _check_sampled(row: TeacherRow, spec: ShardSpec, at: str, num_pos: int) -> list[str]:
    sizes_P, ids_S, counts_S = row.sample_sizes_P, row.sample_ids_S, row.sample_counts_S
    if len(sizes_P) != num_pos:
        return [f"{at}: {len(sizes_P)} target positions for {num_pos + 1} tokens"]
    problems = []
    if ids_S.size and (ids_S.min() < 0 or ids_S.max() >= spec.vocab_size):
        problems.append(f"{at}: sampled id outside [0, {spec.vocab_size})")
    if counts_S.size and counts_S.min() < 1:
        problems.append(f"{at}: sampled count below 1")
    starts_P = np.cumsum(sizes_P) - sizes_P
    sums_P = np.add.reduceat(counts_S, starts_P[sizes_P > 0]) if counts_S.size else np.zeros(0, np.int64)
    full_sums_P = np.zeros(num_pos, np.int64)
    full_sums_P[sizes_P > 0] = sums_P
    off_P = full_sums_P != spec.targets.num_samples
    if off_P.any():
        p = int(np.argmax(off_P))
        problems.append(f"{at}: position {p}: counts sum to {full_sums_P[p]}, expected N={spec.targets.num_samples}")
    group_S = np.repeat(np.arange(num_pos), sizes_P)
    repeated = (np.diff(ids_S) <= 0) & (np.diff(group_S) == 0)
    if repeated.any():
        problems.append(f"{at}: position {int(group_S[np.argmax(repeated)])}: sampled ids not distinct")
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

    def _add(self, name: str, values: np.ndarray) -> None:
        self.values.setdefault(name, []).append(np.asarray(values, dtype=np.float64))

    def _flag(self, name: str, flags: np.ndarray) -> None:
        self.flags.setdefault(name, []).append(np.asarray(flags, dtype=bool))

    def add(self, row: TeacherRow) -> None:
        self.rows += 1
        next_ids_P = row.input_ids_L[1:].astype(np.int64)
        if row.labels_L is not None:
            self._flag("trained_position", row.labels_L[1:] != IGNORE_INDEX)
        if self.spec.targets.mode == "topk":
            self._add_topk(row, next_ids_P)
        else:
            self._add_sampled(row, next_ids_P)
        for layer, hidden_HD in row.hidden.items():
            self.hidden_norms.setdefault(layer, []).append(hidden_HD.float().norm(dim=-1).numpy())
            if hidden_HD.numel():
                max_abs = float(hidden_HD.abs().max())
                self.hidden_max_abs[layer] = max(self.hidden_max_abs.get(layer, 0.0), max_abs)

    def _add_topk(self, row: TeacherRow, next_ids_P: np.ndarray) -> None:
        temperature = self.spec.targets.temperatures[self.t_index]
        logp_PK = row.topk_logits_PK.astype(np.float64) / temperature - row.lse_PT[:, self.t_index, None]
        p_PK = np.exp(logp_PK)
        mass_P = p_PK.sum(axis=1)
        tail_P = np.clip(1.0 - mass_P, 0.0, 1.0)
        kept_entropy_P = -(p_PK * logp_PK).sum(axis=1)
        rest = self.spec.vocab_size - self.spec.targets.k
        with np.errstate(divide="ignore", invalid="ignore"):
            # Tail tokens are each below the smallest kept probability (lower
            # bound) and at most uniform over the rest of the vocabulary (upper).
            tail_low_P = np.where(tail_P > 0, -tail_P * logp_PK.min(axis=1, initial=0.0), 0.0)
            tail_high_P = np.where(tail_P > 0, tail_P * (np.log(max(rest, 1)) - np.log(tail_P)), 0.0)
        self._add("top1_prob", p_PK.max(axis=1, initial=0.0))
        self._add("topk_mass", mass_P)
        self._add("tail_mass", tail_P)
        self._add("entropy_lower", kept_entropy_P + tail_low_P)
        self._add("entropy_upper", kept_entropy_P + tail_high_P)
        self._flag("next_token_in_topk", (row.topk_ids_PK == next_ids_P[:, None]).any(axis=1))
        top1_ids_P = row.topk_ids_PK[np.arange(len(p_PK)), p_PK.argmax(axis=1)] if len(p_PK) else next_ids_P
        self._flag("next_token_is_top1", top1_ids_P == next_ids_P)

    def _add_sampled(self, row: TeacherRow, next_ids_P: np.ndarray) -> None:
        sizes_P = row.sample_sizes_P
        num_samples = self.spec.targets.num_samples
        group_S = np.repeat(np.arange(len(sizes_P)), sizes_P)
        freq_S = row.sample_counts_S / num_samples
        top1_P = np.zeros(len(sizes_P))
        np.maximum.at(top1_P, group_S, freq_S)
        entropy_P = np.zeros(len(sizes_P))
        np.add.at(entropy_P, group_S, -freq_S * np.log(freq_S))
        hit_P = np.zeros(len(sizes_P), dtype=bool)
        hit_P[group_S[row.sample_ids_S == next_ids_P[group_S]]] = True
        self._add("distinct_ids", sizes_P)
        self._add("top1_freq", top1_P)
        self._add("sample_entropy", entropy_P)
        self._flag("next_token_sampled", hit_P)

    def report(self) -> dict:
        out = {"rows": self.rows, "temperature": self.spec.targets.temperatures[self.t_index]
               if self.spec.targets.mode == "topk" else 1.0}
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
    if decode_token is not None:
        out["tokens"] = [decode_token(int(i)) for i in row.input_ids_L]
    positions = []
    temps = spec.targets.temperatures
    if spec.targets.mode != "topk":
        starts_P = np.cumsum(row.sample_sizes_P) - row.sample_sizes_P
    for t in range(row.num_positions):
        entry = {"t": t, "next_token": int(row.input_ids_L[t + 1]), "next_label": int(row.labels_L[t + 1])}
        if spec.targets.mode == "topk":
            order = np.argsort(-row.topk_logits_PK[t], kind="stable")
            logits_K = row.topk_logits_PK[t][order].astype(np.float64)
            entry["ids"] = row.topk_ids_PK[t][order].tolist()
            entry["logits"] = logits_K.tolist()
            entry["logprobs"] = {str(T): (logits_K / T - float(row.lse_PT[t, i])).tolist()
                                 for i, T in enumerate(temps)}
            entry["lse"] = {str(T): float(row.lse_PT[t, i]) for i, T in enumerate(temps)}
        else:
            start = int(starts_P[t])
            ids = row.sample_ids_S[start:start + row.sample_sizes_P[t]]
            counts = row.sample_counts_S[start:start + row.sample_sizes_P[t]]
            order = np.lexsort((ids, -counts))
            entry["ids"] = ids[order].tolist()
            entry["counts"] = counts[order].tolist()
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
        manifest, raw = _manifest_and_json(path)
        shards = sorted(manifest.shards, key=lambda e: e.index)
        return "cache", manifest, raw, [(resolve_inside(path, e.file), e) for e in shards]
    if not path.is_file():
        raise ShardFormatError(f"{path}: no such shard file or cache directory")
    manifest = raw = None
    entry = None
    sidecar = path.with_name(path.name + ".json")
    if sidecar.is_file():
        entry = read_sidecar(sidecar)
    if (path.parent / MANIFEST_NAME).is_file():
        manifest, raw = _manifest_and_json(path.parent)
        if entry is None:
            entry = next((e for e in manifest.shards if e.file == path.name), None)
    return "shard", manifest, raw, [(path, entry)]


def _manifest_and_json(cache_dir: Path) -> tuple[CacheManifest, dict]:
    """The manifest, and its JSON as written (its totals are checked against the shards)."""
    return load_manifest(cache_dir), json.loads((cache_dir / MANIFEST_NAME).read_text())


def _open_shard(path: Path, entry: ShardEntry | None, manifest: CacheManifest | None, verify: bool) -> _Shard:
    # The checksum comes first: a changed file is named as such, whatever else breaks.
    with ShardReader(path, columns=["input_ids"], entry=entry, verify_checksum=verify) as reader:
        spec = reader.spec
        if manifest is not None and spec != manifest.spec:
            raise ShardFormatError(f"{path}: shard spec differs from the manifest's spec")
        rows = tokens = positions = 0
        row_ids = []
        for b in range(reader.num_batches):
            batch = reader.read_batch(b)
            lengths = batch.column("input_ids").value_lengths().to_numpy(zero_copy_only=False)
            row_ids.append(batch.column("row_id").to_numpy(zero_copy_only=False).astype(np.int64))
            rows += len(lengths)
            tokens += int(lengths.sum())
            positions += int(np.maximum(lengths - 1, 0).sum())
    if entry is not None:
        for name, held in (("rows", rows), ("tokens", tokens), ("positions", positions)):
            if getattr(entry, name) != held:
                raise ShardFormatError(f"{path}: manifest says {getattr(entry, name)} {name}, the shard holds {held}")
    return _Shard(path, entry, spec, reader.schema, path.stat().st_size, rows, tokens, positions, reader.num_batches,
                  column_bytes(path), np.concatenate(row_ids or [np.zeros(0, np.int64)]))


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
    if options.row is not None:
        shard, row = _find_row(shards, options.row, path)
        report["row"] = {"index": options.row, "shard": shard.path.name, **row_report(row, spec, decode_token)}
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
               if c.name not in (*TOKEN_COLUMNS, CHECKSUM_COLUMN) and not c.name.startswith("hidden")]
    hidden = [c for c in merged.values() if c.name.startswith("hidden")]
    return columns, {
        "file_bytes": file_bytes,
        "overhead_bytes": file_bytes - sum(c.compressed for c in merged.values()),
        "bytes_per_token": per_token(file_bytes),
        "target_bytes_per_token": per_token(sum(c.compressed for c in targets)),
        "hidden_bytes_per_token": per_token(sum(c.compressed for c in hidden)),
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
