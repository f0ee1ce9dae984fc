"""The exact rows a shard should hold, from the synthetic peaked teacher
(`demo/peaked_teacher.py`), and caches written and damaged on purpose.

`teacher_row` turns peaked logits into `TeacherRow`s with exact targets:
top-k by torch.topk, log-sum-exp in float64, sampled draws by inverse CDF in
float64, and greedy next tokens, so input_ids[t + 1] is position t's top-1 id
(target t predicts token t + 1). `write_cache` writes such rows as a cache
directory (through `synthetic_cache.write_cache_rows`) and `rewrite_shard` copies a shard with changes, for corruption tests;
`flip_cell_byte` changes one stored byte of one cell in place, as a bad disk
would, and reseals the shard's sha256 so that only the row checksums see it.

Shape suffixes: P positions, V vocabulary, K top-k width, T temperatures,
L tokens, H stored hidden positions, D hidden size.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch

from common.causal_lm import IGNORE_INDEX
from common.cache_dir import CacheDir
from common.manifest import file_sha256, read_sidecar
from common.shard_format import CHECKSUM_COLUMN, SCHEMA_METADATA_KEY, TeacherRow, row_checksums
from common.shard_reader import row_cells
from common.spec import ShardSpec, hidden_positions
from common.targets.sampled import SampledRowTargets
from common.targets.topk import TopkRowTargets
from demo.peaked_teacher import PeakedConfig, hidden_like, lse_float64, peaked_logits, sample_counts
from synthetic_cache import write_cache_rows


@dataclass
class RowTruth:
    """What was written for one row, in full precision, for the tests to compare."""

    row: TeacherRow
    logits_PV: np.ndarray  # float32 logits at T=1, the truth
    lse_PT: np.ndarray  # float64
    hidden: dict[int, torch.Tensor]  # float32, at row.hidden_positions_H


def teacher_row(spec: ShardSpec, row_id: int, length: int, seed: int,
                config: PeakedConfig = PeakedConfig(), prompt_tokens: int = 3) -> RowTruth:
    """A row of `length` tokens with exact targets for `spec` (see module docstring)."""
    num_pos = length - 1
    logits_PV = peaked_logits(num_pos, spec.vocab_size, seed=seed * 1000 + row_id, config=config)
    rng = np.random.default_rng([seed, row_id, 2])
    input_ids_L = np.empty(length, dtype=np.int32)
    input_ids_L[0] = rng.integers(spec.vocab_size)
    # Greedy continuation: the target at t is the teacher's view of token t + 1.
    input_ids_L[1:] = logits_PV.argmax(axis=1)
    labels_L = input_ids_L.copy()
    labels_L[:min(prompt_tokens, length)] = IGNORE_INDEX

    row = TeacherRow(row_id=row_id, input_ids_L=input_ids_L, labels_L=labels_L)
    tspec = spec.targets
    lse_PT = lse_float64(logits_PV, tspec.temperatures)
    if tspec.mode == "topk":
        vals, ids = torch.from_numpy(logits_PV).topk(tspec.k, dim=1)
        row.targets = TopkRowTargets(ids_PK=ids.numpy().astype(np.int64), logits_PK=vals.numpy(),
                                     lse_PT=lse_PT.astype(np.float32))
    else:
        rng_u = np.random.Generator(np.random.PCG64([tspec.seed, row_id, 0x53414D50]))
        uniforms_PM = rng_u.random((num_pos, tspec.num_samples))
        ids_S, counts_S, sizes_P = sample_counts(logits_PV, uniforms_PM)
        row.targets = SampledRowTargets(sizes_P=sizes_P, ids_S=ids_S, counts_S=counts_S)

    hidden = {}
    hspec = spec.hidden
    if hspec.layers:
        positions_H = hidden_positions(row_id, length, hspec.token_fraction, hspec.seed)
        row.hidden_positions_H = positions_H
        for layer in hspec.layers:
            full_LD = hidden_like(length, hspec.hidden_size, seed=seed * 1000 + row_id * 10 + layer)
            hidden[layer] = full_LD[torch.from_numpy(positions_H).long()]
        row.hidden = dict(hidden)
    return RowTruth(row=row, logits_PV=logits_PV, lse_PT=lse_PT, hidden=hidden)


# ---------------------------------------------------------------- caches on disk

def write_cache(cache_dir: Path, spec: ShardSpec, lengths_per_shard: list[list[int]], seed: int = 0,
                batch_rows: int = 2, tweak: Callable[[TeacherRow], None] | None = None):
    """Shards of teacher rows plus a manifest; returns {row_id: RowTruth}.

    `tweak` may change each row before it is written (to plant a bad value).
    """
    truths, shards, row_id = {}, [], 0
    for lengths in lengths_per_shard:
        shards.append([])
        for length in lengths:
            truth = teacher_row(spec, row_id, length, seed)
            truths[row_id] = truth
            if tweak is not None:
                tweak(truth.row)
            shards[-1].append(truth.row)
            row_id += 1
    write_cache_rows(cache_dir, spec, shards, batch_rows=batch_rows, teacher={"model": "peaked-synthetic"},
                     source={"path": "synthetic"})
    return truths


def rewrite_shard(src: Path, dst: Path, transform, spec_change: dict | None = None,
                  keep_checksums: bool = False) -> None:
    """Copy a shard through Arrow, changing its table and/or its spec metadata.

    The rows' checksums are recomputed from the changed cells, as a writer given
    them would have stored them; `keep_checksums` keeps the stored ones (bytes
    that changed after writing)."""
    with pa.memory_map(str(src)) as source:
        table = ipc.open_file(source).read_all()
    table = transform(table)
    if not keep_checksums and CHECKSUM_COLUMN in table.schema.names:
        table = _with_fresh_checksums(table)
    metadata = dict(table.schema.metadata)
    if spec_change:
        spec_dict = json.loads(metadata[SCHEMA_METADATA_KEY])
        spec_dict.update(spec_change)
        metadata[SCHEMA_METADATA_KEY] = json.dumps(spec_dict).encode()
    table = table.replace_schema_metadata(metadata)
    options = ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=3))
    with ipc.new_file(str(dst), table.schema, options=options) as writer:
        writer.write_table(table)


def _with_fresh_checksums(table: pa.Table) -> pa.Table:
    columns = [name for name in table.schema.names if name != CHECKSUM_COLUMN]
    field = table.schema.field(CHECKSUM_COLUMN)
    if len(columns) != field.type.list_size:
        return table  # a column was dropped: readers refuse the shard before any checksum
    sums = [row_checksums(row_cells(batch, r), columns) for batch in table.to_batches() for r in range(batch.num_rows)]
    flat = pa.array(np.concatenate(sums) if sums else [], type=field.type.value_type)
    return table.set_column(table.schema.get_field_index(CHECKSUM_COLUMN), field,
                            pa.FixedSizeListArray.from_arrays(flat, len(columns)))


def flip_cell_byte(cache_dir: Path, row_id: int, column: str, byte: int = 0, mask: int = 0x01) -> Path:
    """XOR one byte of a binary cell (default: the lowest bit of its first byte,
    a change no value check can see), rewrite the shard (zstd re-encodes it, so
    it decodes as before) and record the new size and sha256 in its sidecar and
    the manifest. Returns the shard's path."""
    cache = CacheDir(cache_dir)
    entry = next(e for e in cache.manifest().shards if e.row_start <= row_id < e.row_end)
    path = cache.file(entry.file)

    def flip(table: pa.Table) -> pa.Table:
        index = table.schema.get_field_index(column)
        assert pa.types.is_binary(table.schema.field(index).type), f"{column} is not a binary column"
        cells = table.column(index).to_pylist()
        r = table.column("row_id").to_pylist().index(row_id)
        cell = bytearray(cells[r])
        cell[byte] ^= mask
        cells[r] = bytes(cell)
        return table.set_column(index, table.schema.field(index), pa.array(cells, pa.binary()))

    rewrite_shard(path, path.with_name(path.name + ".flipped"), flip, keep_checksums=True)
    path.with_name(path.name + ".flipped").replace(path)
    sidecar = path.with_name(path.name + ".json")
    cache.write_sidecar(dataclasses.replace(read_sidecar(sidecar), bytes=path.stat().st_size,
                                            sha256=file_sha256(path)))
    cache.refresh_manifest(cache.manifest())
    return path
