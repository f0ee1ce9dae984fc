"""Realistic peaked teacher distributions and the exact rows a shard should hold.

A trained LM's next-token distribution is peaked: one token usually takes
20-90% of the mass, a handful of plausible alternatives share most of the
rest, and a long tail follows a Zipf-like frequency prior. The generator
builds logits that way, per position:

* tail: `-zipf_exponent * log(rank + 1)` plus Gaussian noise (sd `noise`);
* 1-8 plausible alternatives drawn from the same prior, taking a fraction
  f ~ U(0.3, 0.9) of the mass not held by the top token;
* the top token, drawn from the prior, set so its probability is p ~ U(0.2, 0.9).

`clustered_ids=True` ranks ids by id (frequent tokens have small ids, as in BPE
vocabularies whose early merges are the frequent ones), which makes sorted id
deltas small; `False` scatters the ranks over the vocabulary with a random
permutation, the worst case for id coding.

`teacher_row` turns such logits into `TeacherRow`s with exact targets:
top-k by torch.topk, log-sum-exp in float64, sampled draws by inverse CDF in
float64, and greedy next tokens, so input_ids[t + 1] is position t's top-1 id
(target t predicts token t + 1). `write_cache` writes such rows as a cache
directory and `rewrite_shard` copies a shard with changes, for corruption tests;
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
from common.manifest import (CacheManifest, file_sha256, load_manifest, read_sidecar, refresh_manifest,
                             resolve_inside, write_sidecar)
from common.shard_format import CHECKSUM_COLUMN, SCHEMA_METADATA_KEY, TeacherRow, row_checksums
from common.shard_reader import row_cells
from common.shard_writer import ShardWriter
from common.spec import ShardSpec, hidden_positions


@dataclass(frozen=True)
class PeakedConfig:
    zipf_exponent: float = 1.1
    noise: float = 1.0
    top_prob: tuple[float, float] = (0.2, 0.9)
    alternatives: tuple[int, int] = (1, 8)
    alternative_share: tuple[float, float] = (0.3, 0.9)
    clustered_ids: bool = True


def _rank_of_id(vocab_size: int, clustered: bool, seed: int) -> np.ndarray:
    if clustered:
        return np.arange(vocab_size)
    return np.random.default_rng([seed, 7]).permutation(vocab_size)


def peaked_logits(num_positions: int, vocab_size: int, seed: int,
                  config: PeakedConfig = PeakedConfig()) -> np.ndarray:
    """[P, V] float32 teacher logits at T=1 (see the module docstring)."""
    rng = np.random.default_rng([seed, 1])
    rank_V = _rank_of_id(vocab_size, config.clustered_ids, seed)
    prior_V = -config.zipf_exponent * np.log1p(rank_V)
    prior_cdf_V = np.cumsum(np.exp(prior_V - prior_V.max()))

    # float32 for the [P, V] work (the result is float32 anyway); the exact
    # references are computed later from the returned logits in float64.
    logits_PV = rng.standard_normal((num_positions, vocab_size), dtype=np.float32)
    logits_PV *= np.float32(config.noise)
    logits_PV += prior_V.astype(np.float32)[None, :]
    lse_all_P = _lse_rows(logits_PV)
    for p in range(num_positions):
        row_V = logits_PV[p]
        num_alt = int(rng.integers(config.alternatives[0], config.alternatives[1] + 1))
        draws = np.searchsorted(prior_cdf_V, rng.random(num_alt + 1) * prior_cdf_V[-1], side="right")
        chosen = np.unique(np.minimum(draws, vocab_size - 1))
        rng.shuffle(chosen)
        top, alts = chosen[0], chosen[1:]
        # Mass of the tail without the chosen ids (they are about to be replaced).
        rest_lse = lse_all_P[p] + np.log1p(-np.exp(row_V[chosen] - lse_all_P[p]).sum())
        # Alternatives take share f of the non-top mass: their logsumexp sits at
        # rest_lse + log(f / (1 - f)); Dirichlet weights split it among them.
        share = rng.uniform(*config.alternative_share)
        non_top_lse = rest_lse
        if len(alts):
            alt_lse = rest_lse + np.log(share / (1 - share))
            weights = rng.dirichlet(np.full(len(alts), 0.7))
            row_V[alts] = alt_lse + np.log(np.maximum(weights, 1e-12))
            non_top_lse = np.logaddexp(rest_lse, alt_lse)
        top_prob = rng.uniform(*config.top_prob)
        row_V[top] = non_top_lse + np.log(top_prob / (1 - top_prob))
    # Shift so the maximum logit is about 20-30, as real lm_heads produce.
    logits_PV += (rng.uniform(20.0, 30.0, size=(num_positions, 1))
                  - logits_PV.max(axis=1, keepdims=True)).astype(np.float32)
    return logits_PV


def _lse_rows(x_PV: np.ndarray) -> np.ndarray:
    m_P = x_PV.max(axis=1)
    return m_P.astype(np.float64) + np.log(np.exp(x_PV - m_P[:, None]).sum(axis=1, dtype=np.float64))


CHUNK_POSITIONS = 64  # float64 [chunk, V] work arrays stay near 100 MB at V = 201,088


def lse_float64(logits_PV: np.ndarray, temperatures: tuple[float, ...]) -> np.ndarray:
    """[P, T] exact log-sum-exp of logits / T over the full vocabulary."""
    out_PT = np.empty((len(logits_PV), len(temperatures)))
    for start in range(0, len(logits_PV), CHUNK_POSITIONS):
        x_pV = logits_PV[start:start + CHUNK_POSITIONS].astype(np.float64)
        for ti, t in enumerate(temperatures):
            scaled = x_pV / t
            m = scaled.max(axis=1, keepdims=True)
            out_PT[start:start + len(x_pV), ti] = (m + np.log(np.exp(scaled - m).sum(axis=1, keepdims=True)))[:, 0]
    return out_PT


def sample_counts(logits_PV: np.ndarray, uniforms_PM: np.ndarray):
    """Inverse-CDF draws at T=1 in float64 -> (distinct ids ascending, counts, sizes_P)."""
    ids, counts, sizes = [], [], []
    vocab_size = logits_PV.shape[1]
    for start in range(0, len(logits_PV), CHUNK_POSITIONS):
        x_pV = logits_PV[start:start + CHUNK_POSITIONS].astype(np.float64)
        cdf_pV = np.cumsum(np.exp(x_pV - x_pV.max(axis=1, keepdims=True)), axis=1)
        for p in range(len(x_pV)):
            draws = np.searchsorted(cdf_pV[p], uniforms_PM[start + p] * cdf_pV[p, -1], side="right")
            u, c = np.unique(np.minimum(draws, vocab_size - 1), return_counts=True)
            ids.append(u)
            counts.append(c)
            sizes.append(len(u))
    if not sizes:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    return np.concatenate(ids).astype(np.int64), np.concatenate(counts).astype(np.int64), np.array(sizes, np.int64)


def hidden_like(num_tokens: int, dim: int, seed: int) -> torch.Tensor:
    """Residual-stream-like states: Gaussian with a few large outlier channels."""
    rng = np.random.default_rng([seed, 3])
    channel_scale_D = np.ones(dim)
    channel_scale_D[rng.choice(dim, size=max(1, dim // 64), replace=False)] = 20.0
    return torch.from_numpy((rng.standard_normal((num_tokens, dim)) * channel_scale_D).astype(np.float32))


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
        row.topk_ids_PK = ids.numpy().astype(np.int64)
        row.topk_logits_PK = vals.numpy()
        row.lse_PT = lse_PT.astype(np.float32)
    else:
        rng_u = np.random.Generator(np.random.PCG64([tspec.seed, row_id, 0x53414D50]))
        uniforms_PM = rng_u.random((num_pos, tspec.num_samples))
        row.sample_ids_S, row.sample_counts_S, row.sample_sizes_P = sample_counts(logits_PV, uniforms_PM)

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


def topk_tail_kl(logits_true_PK: np.ndarray, lse_true_P: np.ndarray, logits_dec_PK: np.ndarray,
                 lse_dec_P: np.ndarray, temperature: float) -> np.ndarray:
    """KL(exact || decoded) over k kept ids + one tail bucket, per position, float64.

    Both sides are ordered the same way (the caller aligns the ids).
    """
    logq_PK = logits_true_PK.astype(np.float64) / temperature - lse_true_P[:, None]
    logp_PK = logits_dec_PK.astype(np.float64) / temperature - lse_dec_P.astype(np.float64)[:, None]
    q_PK, p_PK = np.exp(logq_PK), np.exp(logp_PK)
    q_tail = np.clip(1.0 - q_PK.sum(axis=1), 1e-30, None)
    p_tail = np.clip(1.0 - p_PK.sum(axis=1), 1e-30, None)
    return (q_PK * (logq_PK - logp_PK)).sum(axis=1) + q_tail * np.log(q_tail / p_tail)


# ---------------------------------------------------------------- caches on disk

def write_cache(cache_dir: Path, spec: ShardSpec, lengths_per_shard: list[list[int]], seed: int = 0,
                batch_rows: int = 2, tweak: Callable[[TeacherRow], None] | None = None):
    """Shards of teacher rows plus a manifest; returns {row_id: RowTruth}.

    `tweak` may change each row before it is written (to plant a bad value).
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    truths, row_id = {}, 0
    for index, lengths in enumerate(lengths_per_shard):
        start = row_id
        with ShardWriter(cache_dir, index, spec, start, start + len(lengths), batch_rows=batch_rows) as writer:
            for length in lengths:
                truth = teacher_row(spec, row_id, length, seed)
                truths[row_id] = truth
                if tweak is not None:
                    tweak(truth.row)
                writer.add(truth.row)
                row_id += 1
            writer.close()
    refresh_manifest(cache_dir, CacheManifest(spec=spec, teacher={"model": "peaked-synthetic"},
                                              tokenizer={"vocab_size": spec.vocab_size}, source={"path": "synthetic"}))
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
    entry = next(e for e in load_manifest(cache_dir).shards if e.row_start <= row_id < e.row_end)
    path = resolve_inside(cache_dir, entry.file)

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
    write_sidecar(cache_dir, dataclasses.replace(read_sidecar(sidecar), bytes=path.stat().st_size,
                                                 sha256=file_sha256(path)))
    refresh_manifest(cache_dir, load_manifest(cache_dir))
    return path
