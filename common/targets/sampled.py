"""Sampled targets: N draws with replacement from the teacher's T=1
distribution, stored as each position's distinct ids (ascending) and their
draw counts; the target probability of an id is count / N.

Cells: `sample_sizes` uint16 planes (P), `sample_ids` delta-coded byte planes
(S), `sample_counts` uint8/uint16 planes (S). Shape suffixes: P positions,
S flattened (position, distinct id) entries, M distinct ids per position
(padded to the batch's largest), B batch rows, N flattened positions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from common import codec
from common.targets import BatchTargets, RowTargets, TargetKind, register
from common.targets.topk import check_target_ids


@dataclass
class SampledRowTargets(RowTargets):
    """One row's sampled targets: distinct ids per position (ascending) and their draw counts."""

    sizes_P: np.ndarray  # distinct ids per position
    ids_S: np.ndarray
    counts_S: np.ndarray

    @property
    def num_positions(self) -> int:
        return len(self.sizes_P)

    def encode(self, spec, num_positions, where) -> dict:
        sizes_P = np.asarray(self.sizes_P, dtype=np.int64)
        ids_S = np.asarray(self.ids_S, dtype=np.int64)
        counts_S = np.asarray(self.counts_S, dtype=np.int64)
        if sizes_P.shape != (num_positions,) or ids_S.shape != counts_S.shape or len(ids_S) != sizes_P.sum():
            raise ValueError(f"{where}: sampled arrays disagree in length")
        if ids_S.size and (ids_S.min() < 0 or ids_S.max() >= spec.vocab_size):
            raise ValueError(f"{where}: sampled id outside [0, {spec.vocab_size})")
        ids_S, counts_S = codec.sort_groups(ids_S, sizes_P, counts_S)
        return {"sample_sizes": codec.to_planes(sizes_P.astype(np.uint16), 2),
                "sample_ids": codec.encode_ids(ids_S, sizes_P, spec.id_bytes),
                "sample_counts": codec.to_planes(counts_S.astype(np.uint16), spec.targets.count_bytes)}

    @classmethod
    def decode(cls, cells, spec) -> "SampledRowTargets | None":
        if "sample_sizes" not in cells:
            return None
        num_pos = len(cells["sample_sizes"]) // 2
        sizes_P = codec.from_planes(cells["sample_sizes"], 2, np.uint16, num_pos).astype(np.int64)
        total = int(sizes_P.sum())
        return cls(sizes_P=sizes_P, ids_S=codec.decode_ids(cells["sample_ids"], sizes_P, spec.id_bytes),
                   counts_S=codec.from_planes(cells["sample_counts"], spec.targets.count_bytes, np.uint16,
                                              total).astype(np.int64))


@dataclass
class SampledBatchTargets(BatchTargets):
    """A batch's sampled targets for positions 0..L-2, [B, P, M]. Pads: id -1 and count 0."""

    ids_BPM: Tensor  # int64
    counts_BPM: Tensor  # int64

    def fill_row(self, b, row: SampledRowTargets, start: int = 0) -> None:
        # flattened (position, distinct id) entries -> [P, M] slots
        sizes_P = row.sizes_P
        starts_P = np.cumsum(sizes_P) - sizes_P
        pos_S = start + np.repeat(np.arange(row.num_positions), sizes_P)
        slot_S = np.arange(int(sizes_P.sum())) - np.repeat(starts_P, sizes_P)
        self.ids_BPM.numpy()[b, pos_S, slot_S] = row.ids_S
        self.counts_BPM.numpy()[b, pos_S, slot_S] = row.counts_S

    def loss_targets(self, n, layout) -> "SampledTargets":
        m = self.ids_BPM.shape[-1]
        return SampledTargets(ids_NM=self.ids_BPM.reshape(n, m), counts_NM=self.counts_BPM.reshape(n, m),
                              num_samples=layout.num_samples)


@register
class SampledKind(TargetKind):
    mode = "sampled"
    described = "sampled"
    row_targets = SampledRowTargets

    def check_spec(self, tspec, vocab_size=None) -> None:
        if not (1 <= tspec.num_samples <= 65535):
            raise ValueError(f"sampled mode needs 1 <= num_samples <= 65535, got {tspec.num_samples}")

    def schema_fields(self) -> list[pa.Field]:
        return [pa.field("sample_sizes", pa.binary()), pa.field("sample_ids", pa.binary()),
                pa.field("sample_counts", pa.binary())]

    def bytes_per_token(self, spec) -> float:
        t = spec.targets
        return 2 + t.num_samples * (spec.id_bytes + t.count_bytes)

    def check_row(self, row, spec, at, num_pos) -> list[str]:
        sizes_P, ids_S, counts_S = row.targets.sizes_P, row.targets.ids_S, row.targets.counts_S
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

    def add_statistics(self, stats, row, spec, next_ids_P) -> None:
        targets = row.targets
        sizes_P = targets.sizes_P
        group_S = np.repeat(np.arange(len(sizes_P)), sizes_P)
        freq_S = targets.counts_S / spec.targets.num_samples
        top1_P = np.zeros(len(sizes_P))
        np.maximum.at(top1_P, group_S, freq_S)
        entropy_P = np.zeros(len(sizes_P))
        np.add.at(entropy_P, group_S, -freq_S * np.log(freq_S))
        hit_P = np.zeros(len(sizes_P), dtype=bool)
        hit_P[group_S[targets.ids_S == next_ids_P[group_S]]] = True
        stats.add_values("distinct_ids", sizes_P)
        stats.add_values("top1_freq", top1_P)
        stats.add_values("sample_entropy", entropy_P)
        stats.add_flags("next_token_sampled", hit_P)

    def position_entries(self, row, spec) -> list[dict]:
        targets = row.targets
        starts_P = np.cumsum(targets.sizes_P) - targets.sizes_P
        entries = []
        for t in range(row.num_positions):
            start = int(starts_P[t])
            ids = targets.ids_S[start:start + targets.sizes_P[t]]
            counts = targets.counts_S[start:start + targets.sizes_P[t]]
            order = np.lexsort((ids, -counts))
            entries.append({"ids": ids[order].tolist(), "counts": counts[order].tolist()})
        return entries

    def describe(self, tspec) -> str:
        return f"sampled, {tspec.num_samples} draws per position (seed {tspec.seed})"

    def describe_recorded(self, targets) -> str:
        return f"sampled N={targets['num_samples']}, seed={targets['seed']}"

    def position_shares(self, entry, targets, top) -> list[str]:
        return [f"{c}/{targets['num_samples']}" for c in entry["counts"][:top]]

    def batch_targets(self, rows, spec, B, P, full) -> SampledBatchTargets:
        M = max((int(r.targets.sizes_P.max()) for r in rows if r.num_positions), default=0)
        return SampledBatchTargets(ids_BPM=full((B, P, M), -1, torch.int64), counts_BPM=full((B, P, M), 0, torch.int64))

    def synthetic_batch_targets(self, spec, B, P, gen) -> SampledBatchTargets:
        t, V = spec.targets, spec.vocab_size
        m = min(t.num_samples, V)
        offset_BP1 = torch.randint(0, V, (B, P, 1), generator=gen)
        counts_BPM = torch.zeros(B, P, m, dtype=torch.int64)
        counts_BPM[..., 0] = t.num_samples
        return SampledBatchTargets(ids_BPM=(offset_BP1 + torch.arange(m)) % V, counts_BPM=counts_BPM)

    def stand_in_spec(self, kl_temperature):
        from common.spec import TargetSpec  # here: common.spec imports the kinds

        return TargetSpec(mode=self.mode, num_samples=50)


@dataclass(frozen=True)
class SampledTargets:
    """Sampled targets as the loss reads them."""

    ids_NM: Tensor  # int64 distinct sampled ids, padded with -1
    counts_NM: Tensor  # draws per id, 0 where padded
    num_samples: int  # draws per position (N_s); the target probability is count / N_s

    cache_mode: ClassVar[str] = SampledKind.mode
    described: ClassVar[str] = SampledKind.described

    def rows(self, index) -> "SampledTargets":
        return dataclasses.replace(self, ids_NM=self.ids_NM[index], counts_NM=self.counts_NM[index])

    def teacher_top1_N(self) -> Tensor:
        return self.ids_NM.gather(1, self.counts_NM.argmax(-1, keepdim=True)).squeeze(1)

    def check(self, n: int, vocab: int) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        check_target_ids(self.ids_NM, self.counts_NM, n, vocab, lowest_id=-1)  # -1: padding
