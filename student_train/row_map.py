"""Which cache row lives where: every shard's row ids and lengths (the token column alone is read),
checked against the manifest, numbered in manifest order; and, where the cache stores it, each
row's source. Every rank builds the same map, so every rank computes the same epoch plan.

Shape suffixes: N rows of the cache, R rows of one shard.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.cache_dir import CacheDir, scan_shard
from common.manifest import CacheManifest, ShardEntry
from common.row_columns import SOURCE
from common.shard_format import ShardFormatError
from common.shard_reader import ShardReader
from common.spec import ShardSpec


@dataclass
class RowMap:
    """Where each cache row lives; rows are numbered in manifest order (shard index, then row)."""

    paths: list[Path]
    entries: list[ShardEntry]
    shard_N: np.ndarray  # which shard
    index_N: np.ndarray  # row index inside the shard
    row_id_N: np.ndarray  # source row id
    length_N: np.ndarray  # tokens
    # Caches that store each row's source: the sorted names, and each row's index into them
    source_names: list[str] = dataclasses.field(default_factory=list)
    source_id_N: np.ndarray | None = None


def _scan_shard(path: Path, entry: ShardEntry, spec: ShardSpec, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, lengths) of one shard; reads only the row_id and input_ids columns."""
    scan = scan_shard(path, entry, spec)
    row_id_R, length_R = scan.row_id_R, scan.length_R
    if len(row_id_R) != entry.rows:
        raise ShardFormatError(f"{path}: holds {len(row_id_R)} rows, manifest says {entry.rows}")
    bad = np.flatnonzero((length_R > seq_len) | (length_R < 1))
    if len(bad):
        r = bad[0]
        raise ValueError(f"{path}: row {row_id_R[r]} has {length_R[r]} tokens; the loader needs 1 to "
                         f"seq_len={seq_len}")
    return row_id_R, length_R


def build_row_map(cache: CacheDir, manifest: CacheManifest, seq_len: int, executor: ThreadPoolExecutor) -> RowMap:
    where = cache.manifest_path
    if not manifest.shards:
        raise ValueError(f"{where}: the cache has no shards")
    for key in ("index", "file"):
        values = [getattr(e, key) for e in manifest.shards]
        if len(set(values)) != len(values):
            raise ShardFormatError(f"{where}: two shard entries share a {key}")
    shards = cache.shard_files(manifest)
    scans = list(executor.map(lambda pe: _scan_shard(*pe, manifest.spec, seq_len), shards))
    row_id_N = np.concatenate([ids for ids, _ in scans])
    unique, counts = np.unique(row_id_N, return_counts=True)
    if (counts > 1).any():
        raise ShardFormatError(f"{where}: row id {unique[counts > 1][0]} appears more than once in the cache")
    row_map = RowMap(
        paths=[path for path, _ in shards], entries=[entry for _, entry in shards],
        shard_N=np.concatenate([np.full(len(ids), s, np.int64) for s, (ids, _) in enumerate(scans)]),
        index_N=np.concatenate([np.arange(len(ids), dtype=np.int64) for ids, _ in scans]),
        row_id_N=row_id_N,
        length_N=np.concatenate([lengths for _, lengths in scans]),
    )
    if SOURCE in manifest.spec.columns:
        row_map.source_names, row_map.source_id_N = _source_table(shards, executor)
    return row_map


def _source_table(shards: list[tuple[Path, ShardEntry]], executor: ThreadPoolExecutor) -> tuple[list[str], np.ndarray]:
    """(sorted source names of the cache, each row's index into them); reads the source column alone,
    so every rank builds the same table."""
    def names_of(path_entry) -> list[str]:
        with ShardReader(path_entry[0], columns=[SOURCE]) as reader:
            return [cells[SOURCE] for cells in reader.iter_cells()]

    names_N = np.array([name for names in executor.map(names_of, shards) for name in names], dtype=object)
    names, source_id_N = np.unique(names_N, return_inverse=True)
    return [str(n) for n in names], source_id_N.astype(np.int64)
