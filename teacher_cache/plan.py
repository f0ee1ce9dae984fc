"""Which rows go into which shard, which worker writes which shard, and how many
bytes the cache will take.

Shard s holds source rows [s * R, min((s + 1) * R, rows)) for R rows per shard
and is written by worker s % W. The assignment depends only on these numbers,
so every worker (on any node, after any restart) agrees on it without talking
to the others.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch

from common.shard_format import TeacherRow, build_schema, encode_row
from common.shard_writer import buffer_codec, build_batch
from common.spec import ShardSpec, hidden_positions
from teacher_cache.targets import compute_targets, selection


@dataclass(frozen=True)
class ShardPlan:
    index: int
    row_start: int
    row_end: int

    @property
    def num_rows(self) -> int:
        return self.row_end - self.row_start


@dataclass(frozen=True)
class WorkerSlot:
    index: int
    count: int


# Automatic shard size (`--rows-per-shard 0`): about this many uncompressed bytes
# per shard. Shards are written by one thread each, and a capture writes several
# at once only when they are small enough that the next one's rows arrive while
# the last is still being compressed: with two fp8 hidden layers of 2880, zstd
# shards of 8 rows captured 44k tokens/s on an H100 where 32-row shards gave 33k
# (docs/BENCHMARKS.md). Targets-only shards are small anyway and hit the row cap.
AUTO_SHARD_RAW_BYTES = 512 << 20
AUTO_ROWS_PER_SHARD_RANGE = (8, 256)


def raw_bytes_per_token(spec: ShardSpec) -> float:
    """Uncompressed cell bytes per token of a shard (an upper bound for sampled targets)."""
    h = spec.hidden
    targets = spec.targets.kind.bytes_per_token(spec)
    per_layer = h.hidden_size * (1 if h.dtype == "fp8" else 2) + (4 if h.dtype == "fp8" else 0)
    return 8 + targets + len(h.layers) * h.token_fraction * per_layer  # + input_ids and labels


def auto_rows_per_shard(spec: ShardSpec, mean_row_tokens: float) -> int:
    rows = AUTO_SHARD_RAW_BYTES / (raw_bytes_per_token(spec) * max(mean_row_tokens, 1.0))
    low, high = AUTO_ROWS_PER_SHARD_RANGE
    return int(min(max(rows, low), high))


def plan_shards(num_rows: int, rows_per_shard: int) -> list[ShardPlan]:
    if rows_per_shard < 1:
        raise ValueError(f"--rows-per-shard must be >= 1, got {rows_per_shard}")
    return [ShardPlan(s, start, min(start + rows_per_shard, num_rows))
            for s, start in enumerate(range(0, num_rows, rows_per_shard))]


def shards_for_worker(plan: list[ShardPlan], worker: WorkerSlot) -> list[ShardPlan]:
    return [s for s in plan if s.index % worker.count == worker.index]


def _env_pair(env: Mapping[str, str], index_key: str, count_key: str) -> tuple[int, int] | None:
    if index_key in env and count_key in env:
        try:
            return int(env[index_key]), int(env[count_key])
        except ValueError as exc:
            raise ValueError(f"environment {index_key}/{count_key} are not integers: "
                             f"{env[index_key]!r}/{env[count_key]!r}") from exc
    return None


def resolve_worker(num_workers: int | None, worker_index: int | None,
                   env: Mapping[str, str] | None = None) -> WorkerSlot:
    """Explicit --num-workers/--worker-index, else torchrun (RANK/WORLD_SIZE), else
    SLURM (SLURM_PROCID/SLURM_NTASKS), else a single worker."""
    env = os.environ if env is None else env
    if num_workers is not None or worker_index is not None:
        if num_workers is None or worker_index is None:
            raise ValueError("--num-workers and --worker-index go together")
        index, count = worker_index, num_workers
    else:
        index, count = (_env_pair(env, "RANK", "WORLD_SIZE") or _env_pair(env, "SLURM_PROCID", "SLURM_NTASKS")
                        or (0, 1))
    if count < 1 or not (0 <= index < count):
        raise ValueError(f"worker index {index} is not in [0, {count})")
    return WorkerSlot(index, count)


def node_local_worker(node: WorkerSlot, local_index: int, local_count: int) -> WorkerSlot:
    """Global slot of GPU `local_index` of `local_count` on node `node`."""
    return WorkerSlot(node.index * local_count + local_index, node.count * local_count)


# ---- storage estimate -------------------------------------------------------

_SAMPLE_POSITIONS = 256
_SAMPLE_CHUNK = 32


def _synthetic_logits(vocab_size: int, seed: int):
    """Next-token logits shaped like a trained LM's: a Zipf prior over a fixed
    token ranking, per-position noise, a handful of preferred ids per position,
    and a per-position sharpness. Mean entropy is about 2 nats and 50 draws give
    about 12 distinct ids, as reported for real teachers."""
    gen = torch.Generator().manual_seed(seed)
    rank_of_id = torch.randperm(vocab_size, generator=gen)
    prior_V = -1.5 * torch.log1p(rank_of_id.double()).float()
    boost_F = torch.tensor([12.0, 10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0])

    def logits_fn(hidden_nD: torch.Tensor) -> torch.Tensor:
        n = hidden_nD.shape[0]
        logits_nV = prior_V + torch.randn((n, vocab_size), generator=gen)
        favourites_nF = torch.randint(0, min(vocab_size, 2000), (n, len(boost_F)), generator=gen)
        logits_nV.scatter_add_(1, favourites_nF, boost_F.expand(n, -1).contiguous())
        return logits_nV * (0.7 + 1.3 * torch.rand((n, 1), generator=gen))

    return logits_fn


def measure_bytes_per_token(spec: ShardSpec, seed: int = 0) -> tuple[float, float]:
    """(target bytes/token, hidden bytes/token per layer) of this spec after the
    shard codec and zstd, measured on synthetic peaked rows (hidden states:
    Gaussian, which compresses about as badly as real residual streams). The optional
    row columns are left out: a few bytes per row, and about none per token."""
    spec = dataclasses.replace(spec, columns=())
    n = _SAMPLE_POSITIONS
    logits_fn = _synthetic_logits(spec.vocab_size, seed)
    chosen = selection(spec.targets)
    targets = compute_targets(torch.zeros(n, 1), logits_fn, spec.targets, chosen.flat_uniforms(spec.targets, [(0, n)]),
                              chunk_size=_SAMPLE_CHUNK)
    tokens_L = np.random.default_rng(seed).integers(0, spec.vocab_size, n + 1).astype(np.int32)
    row = TeacherRow(row_id=0, input_ids_L=tokens_L, labels_L=tokens_L.copy(),
                     targets=chosen.split_rows(targets, [n])[0])
    hspec = spec.hidden
    if hspec.layers:
        positions = hidden_positions(0, n + 1, hspec.token_fraction, hspec.seed)
        gen = torch.Generator().manual_seed(seed + 1)
        row.hidden = {layer: torch.randn((len(positions), hspec.hidden_size), generator=gen) for layer in hspec.layers}
        row.hidden_positions_H = positions
    total = _compressed_size(spec, row)
    if not hspec.layers:
        return total / (n + 1), 0.0
    no_hidden = ShardSpec(vocab_size=spec.vocab_size, targets=spec.targets)
    target_bytes = _compressed_size(no_hidden, row)
    return target_bytes / (n + 1), (total - target_bytes) / (n + 1) / len(hspec.layers)


def _compressed_size(spec: ShardSpec, row: TeacherRow) -> int:
    """Bytes the row adds to a shard (token columns included: they are stored too),
    without the file's fixed schema and footer overhead."""
    schema = build_schema(spec)
    batch = build_batch([encode_row(row, spec)], schema)
    options = ipc.IpcWriteOptions(compression=buffer_codec("zstd"))
    sizes = []
    for batches in ([], [batch]):
        sink = pa.BufferOutputStream()
        with ipc.new_file(sink, schema, options=options) as writer:
            for b in batches:
                writer.write_batch(b)
        sizes.append(sink.getvalue().size)
    return sizes[1] - sizes[0]


@dataclass(frozen=True)
class StorageEstimate:
    tokens: int
    target_bytes_per_token: float
    hidden_bytes_per_token_per_layer: float
    num_layers: int

    @property
    def bytes_per_token(self) -> float:
        return self.target_bytes_per_token + self.hidden_bytes_per_token_per_layer * self.num_layers

    @property
    def total_bytes(self) -> float:
        return self.bytes_per_token * self.tokens


def estimate_storage(spec: ShardSpec, tokens: int) -> StorageEstimate:
    target_bpt, hidden_bpt = measure_bytes_per_token(spec)
    return StorageEstimate(tokens, target_bpt, hidden_bpt, len(spec.hidden.layers))
