"""A cache directory: one object for what both stages do with one.

Layout (`common/manifest.py` models the JSON): `manifest.json`, shard files
`shard-NNNNN.arrow`, and a sidecar `shard-NNNNN.arrow.json` per finished shard.
The sidecars are the source of truth for shards (each is published right after
its shard), so workers on several nodes can share one directory;
`manifest.json` is an index rebuilt from them under `.manifest.lock`. Every
file a manifest or sidecar names must resolve inside the directory
(`CacheDir.file`).

What lives here: creating or resuming a cache for a run (`open_for_run`),
verifying a shard file against its entry (`verify_shard`, one check for size
and sha256), publishing shards and sidecars atomically (`publish_shard`,
`place_shard`), scanning shards for their row ids and lengths (`scan_shard`,
for the loader and inspect), merging caches written by separate workers
(`merge_from`) and reading every row (`read_rows`).

Shape suffixes: R rows of one shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from common.atomic import atomic_write_text, file_lock, publish, remove_stale_tmp, tmp_path_for
from common.manifest import (LOCK_NAME, MANIFEST_NAME, SIDECAR_SUFFIX, CacheManifest, ShardEntry, file_sha256,
                             header_differences, load_manifest, read_sidecar, resolve_inside, shard_file_name)
from common.shard_format import ShardFormatError, TeacherRow, warn_unchecked_rows
from common.shard_reader import ShardReader
from common.spec import ShardSpec

_SHARD_PREFIX = "shard-"


class CacheDir:
    """The files of one cache directory (nothing is created until a method writes)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"CacheDir({str(self.path)!r})"

    # ---- names

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    def has_manifest(self) -> bool:
        return self.manifest_path.is_file()

    def file(self, name: str) -> Path:
        """Path of a file the manifest or a sidecar names; refuses names that leave the directory."""
        return resolve_inside(self.path, name)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Held while the manifest is rewritten (several workers share one directory)."""
        with file_lock(self.path / LOCK_NAME):
            yield

    # ---- the manifest and the sidecars

    def manifest(self) -> CacheManifest:
        return load_manifest(self.path)

    def manifest_json(self) -> dict:
        """The manifest's JSON as written (its totals are checked against the shards)."""
        return json.loads(self.manifest_path.read_text())

    def write_manifest(self, manifest: CacheManifest) -> None:
        atomic_write_text(self.manifest_path, manifest.to_json())

    def sidecars(self) -> list[ShardEntry]:
        """Every published shard's entry, in file-name order."""
        entries = []
        for p in sorted(self.path.glob(f"{_SHARD_PREFIX}*{SIDECAR_SUFFIX}")):
            entry = read_sidecar(p)
            self.file(entry.file)
            entries.append(entry)
        return entries

    def refresh_manifest(self, header: CacheManifest) -> CacheManifest:
        """Rebuild manifest.json from the header and every sidecar, under the lock."""
        with self.lock():
            manifest = dataclasses.replace(header, shards=self.sidecars())
            self.write_manifest(manifest)
        return manifest

    def shard_files(self, manifest: CacheManifest) -> list[tuple[Path, ShardEntry]]:
        """(path, entry) of every shard the manifest lists, in shard-index order."""
        return [(self.file(e.file), e) for e in sorted(manifest.shards, key=lambda e: e.index)]

    # ---- verifying

    def verify_shard(self, entry: ShardEntry) -> Path:
        """The shard's path; ShardFormatError unless its size and sha256 are its entry's."""
        path = self.file(entry.file)
        entry.check_file(path, sha256=True)
        return path

    def shard_is_intact(self, entry: ShardEntry) -> bool:
        try:
            self.verify_shard(entry)
        except ShardFormatError:
            return False
        return True

    # ---- publishing

    def publish_shard(self, tmp: Path, entry: ShardEntry) -> ShardEntry:
        """Rename a finished shard's temporary file to its name, then write its
        sidecar with the published file's size and sha256 (a shard without a
        sidecar is never trusted, so the order matters)."""
        path = self.file(entry.file)
        publish(tmp, path)
        entry = dataclasses.replace(entry, bytes=path.stat().st_size, sha256=file_sha256(path))
        self.write_sidecar(entry)
        return entry

    def write_sidecar(self, entry: ShardEntry) -> None:
        atomic_write_text(self.file(entry.file + ".json"), json.dumps(asdict(entry), sort_keys=True))

    def place_shard(self, src: Path, entry: ShardEntry, link: bool) -> None:
        """Hard-link (same filesystem) or copy `src` to the entry's file atomically, then its sidecar."""
        dest = self.file(entry.file)
        tmp = tmp_path_for(dest)
        try:
            if link:
                tmp.unlink()
                try:
                    os.link(src, tmp)
                except OSError:
                    shutil.copyfile(src, tmp)
            else:
                shutil.copyfile(src, tmp)
            publish(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def remove_shard(self, index: int) -> None:
        name = shard_file_name(index)
        (self.path / (name + ".json")).unlink(missing_ok=True)  # sidecar first: a shard without one is never trusted
        (self.path / name).unlink(missing_ok=True)
        remove_stale_tmp(self.path, name)

    def shard_indices_on_disk(self) -> set[int]:
        indices = set()
        for p in self.path.glob(f"{_SHARD_PREFIX}*"):
            number = p.name.split(".")[0][len(_SHARD_PREFIX):]
            if number.isdigit():
                indices.add(int(number))
        return indices

    # ---- creating or resuming a cache for a run

    def finished_entry(self, index: int, row_start: int, row_end: int) -> ShardEntry | None:
        """The shard's entry if it is published, intact and covers these rows, else None."""
        name = shard_file_name(index)
        sidecar = self.path / (name + ".json")
        if not sidecar.is_file() or not (self.path / name).is_file():
            return None
        try:
            entry = read_sidecar(sidecar)
        except ValueError:
            return None
        if (entry.index, entry.row_start, entry.row_end, entry.file) != (index, row_start, row_end, name):
            return None
        return entry if self.shard_is_intact(entry) else None

    def open_for_run(self, header: CacheManifest, mine: list, *, num_shards: int, drop_beyond: bool,
                     overwrite: bool) -> tuple[list, list[ShardEntry]]:
        """Agree on the header, clean up, and split this worker's planned shards
        `mine` (each with index, row_start, row_end) into (to compute, finished
        and verified). `drop_beyond`: remove shards past `num_shards` (one worker
        does; they belong to nobody, e.g. after a smaller --limit-rows)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with self.lock():
            existing = self.manifest() if self.has_manifest() else None
            if existing is None and list(self.path.glob(f"{_SHARD_PREFIX}*{SIDECAR_SUFFIX}")):
                diffs = [f"no {MANIFEST_NAME} beside its shards"]
            else:
                diffs = header_differences(existing, header) if existing is not None else []
            if diffs:
                if not overwrite:
                    raise ValueError(f"{self.path}: the existing cache differs: {'; '.join(diffs)}. "
                                     f"Pass --overwrite to replace it, or choose another --out")
                for index in self.shard_indices_on_disk():
                    self.remove_shard(index)
            elif overwrite:
                for shard in mine:
                    self.remove_shard(shard.index)
            # A killed run can leave a half-written manifest; only a lock holder writes one.
            remove_stale_tmp(self.path, MANIFEST_NAME)
            if drop_beyond:
                for index in self.shard_indices_on_disk():
                    if index >= num_shards:
                        self.remove_shard(index)
            self.write_manifest(dataclasses.replace(header, shards=self.sidecars()))
        todo, kept = [], []
        for shard in mine:
            entry = self.finished_entry(shard.index, shard.row_start, shard.row_end)
            if entry is not None:
                remove_stale_tmp(self.path, shard_file_name(shard.index))  # an interrupted rewrite of it
                kept.append(entry)
            else:
                self.remove_shard(shard.index)
                todo.append(shard)
        return todo, kept

    # ---- merging caches written by separate workers

    def merge_from(self, sources: list[Path], link: bool = True) -> MergeReport:
        """Join caches written by separate workers into this one (which may be one of them)."""
        # Sidecars, not the manifest's list: a worker killed between publishing a
        # shard and refreshing its manifest still has the shard's sidecar.
        caches = [(cache, dataclasses.replace(cache.manifest(), shards=cache.sidecars()))
                  for cache in map(CacheDir, sources)]
        ref_dir, ref = caches[0]
        others = caches[1:] + ([(self, self.manifest())] if self.has_manifest() else [])
        for cache, m in others:
            diffs = header_differences(ref, m)
            if diffs:
                raise ValueError(f"{cache.path}: cannot merge with {ref_dir.path}: {'; '.join(diffs)}")
        foreign = [(cache, m) for cache, m in caches if cache.path.resolve() != self.path.resolve()]
        owner: dict[int, Path] = {}
        for cache, m in foreign:
            for entry in m.shards:
                if entry.index in owner:
                    raise ValueError(f"shard {entry.index} is in both {owner[entry.index]} and {cache.path}")
                owner[entry.index] = cache.path
        self.path.mkdir(parents=True, exist_ok=True)
        report = MergeReport()
        with self.lock():
            self.write_manifest(dataclasses.replace(ref, shards=self.sidecars()))
        for cache, m in foreign:
            for entry in m.shards:
                src = cache.file(entry.file)
                if not cache.shard_is_intact(entry):
                    raise ValueError(f"{cache.path / entry.file}: missing or does not match its manifest entry "
                                     "(sha256); not merged")
                if self.shard_is_intact(entry):
                    report.shards_present += 1
                else:
                    dest = self.path / entry.file
                    if dest.exists() and dest.resolve() != src.resolve():
                        raise ValueError(f"{dest}: a different shard {entry.index} is already there")
                    self.place_shard(src, entry, link)
                    report.shards_added += 1
                self.write_sidecar(entry)
        merged = self.refresh_manifest(dataclasses.replace(ref, shards=[]))
        present = {e.index for e in merged.shards}
        report.missing = [i for i in range(int(ref.work.get("num_shards", 0))) if i not in present]
        return report

    # ---- reading

    def read_rows(self) -> dict[int, TeacherRow]:
        """Every row by row id, each shard's sha256 and each row's content hash
        verified (for checks and comparisons; training reads through its loader)."""
        rows: dict[int, TeacherRow] = {}
        manifest = self.manifest()
        warn_unchecked_rows(manifest.spec, str(self.path))
        for path, entry in self.shard_files(manifest):
            with ShardReader(path, entry=entry, verify_checksum=True) as reader:
                for row in reader.iter_rows(verify_content=True):
                    if row.row_id in rows:
                        raise ShardFormatError(f"{path}: row {row.row_id} is also in another shard of {self.path}")
                    rows[row.row_id] = row
        return rows


@dataclass
class MergeReport:
    shards_added: int = 0
    shards_present: int = 0
    missing: list[int] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"merged: {self.shards_added} shard(s) added, {self.shards_present} already present"]
        if self.missing:
            shown = ", ".join(str(i) for i in self.missing[:20]) + (" ..." if len(self.missing) > 20 else "")
            out.append(f"missing shard(s) {shown}: run the workers that own them")
        return out


# ---- scanning

@dataclass
class ShardScan:
    """What one shard holds, read from its row_id and input_ids columns alone."""

    path: Path
    entry: ShardEntry | None
    spec: ShardSpec
    schema: pa.Schema
    num_batches: int
    row_id_R: np.ndarray  # in file order
    length_R: np.ndarray  # tokens per row

    @property
    def rows(self) -> int:
        return len(self.row_id_R)

    @property
    def tokens(self) -> int:
        return int(self.length_R.sum())

    @property
    def positions(self) -> int:
        return int(np.maximum(self.length_R - 1, 0).sum())


def scan_shard(path: Path, entry: ShardEntry | None, manifest_spec: ShardSpec | None = None,
               verify_sha256: bool = False) -> ShardScan:
    """Row ids and lengths of one shard, its size (and with `verify_sha256` its
    sha256, before anything else is read) checked against `entry` and its spec
    against the manifest's."""
    with ShardReader(path, columns=["input_ids"], entry=entry, verify_checksum=verify_sha256) as reader:
        if manifest_spec is not None and reader.spec != manifest_spec:
            raise ShardFormatError(f"{path}: shard spec differs from the manifest's")
        row_ids, lengths = [], []
        for b in range(reader.num_batches):
            batch = reader.read_batch(b)
            tokens = batch.column("input_ids")
            if tokens.null_count:
                raise ShardFormatError(f"{path}: record batch {b} has rows without input_ids")
            row_ids.append(batch.column("row_id").to_numpy(zero_copy_only=False))
            lengths.append(tokens.value_lengths().to_numpy(zero_copy_only=False))
        # concatenate copies, so nothing refers to the closed memory map
        return ShardScan(path=Path(path), entry=entry, spec=reader.spec, schema=reader.schema,
                         num_batches=reader.num_batches,
                         row_id_R=np.concatenate(row_ids or [np.zeros(0, np.int64)]).astype(np.int64),
                         length_R=np.concatenate(lengths or [np.zeros(0, np.int64)]).astype(np.int64))
