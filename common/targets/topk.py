"""Top-k targets: the teacher's k largest logits at T=1 with their ids, and the
full-vocabulary log-sum-exp of logits / T for each cached temperature T.

Cells: `topk_ids` delta-coded byte planes (P*K), `topk_values` companded gaps
below each position's max (P*K), `topk_max` and `lse` float32 planes (P and
P*T, position-major). Shape suffixes: P positions, K top-k width,
T temperatures, B batch rows, N flattened positions.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from common import codec
from common.targets import BatchTargets, RowTargets, TargetKind, register

# float32 rounding allowance for log-sum-exp comparisons (relative).
LSE_TOLERANCE = 1e-5


@dataclass
class TopkRowTargets(RowTargets):
    """One row's top-k targets."""

    ids_PK: np.ndarray  # any integer dtype from a backend; int64, ascending per position, after decode
    logits_PK: np.ndarray  # float32 teacher logits at T=1
    lse_PT: np.ndarray  # float32 log-sum-exp of logits / T, full vocabulary

    @property
    def num_positions(self) -> int:
        return len(self.ids_PK)

    def encode(self, spec, num_positions, where) -> dict:
        tspec = spec.targets
        num_pos = num_positions
        ids_PK = np.asarray(self.ids_PK)
        logits_PK = np.asarray(self.logits_PK, dtype=np.float32)
        lse_PT = np.asarray(self.lse_PT, dtype=np.float32)
        if ids_PK.shape != (num_pos, tspec.k) or logits_PK.shape != ids_PK.shape:
            raise ValueError(f"{where}: top-k arrays must be [{num_pos}, {tspec.k}], got {ids_PK.shape} and {logits_PK.shape}")
        if lse_PT.shape != (num_pos, len(tspec.temperatures)):
            raise ValueError(f"{where}: lse must be [{num_pos}, {len(tspec.temperatures)}], got {lse_PT.shape}")
        if ids_PK.size and (ids_PK.min() < 0 or ids_PK.max() >= spec.vocab_size):
            raise ValueError(f"{where}: top-k id outside [0, {spec.vocab_size})")
        max_P = logits_PK.max(axis=1) if num_pos else np.zeros(0, np.float32)
        sizes = np.full(num_pos, tspec.k, dtype=np.int64)
        ids_S, gap_S = codec.sort_groups(ids_PK.reshape(-1).astype(np.int64), sizes,
                                         (max_P[:, None] - logits_PK).reshape(-1))
        return {"topk_ids": codec.encode_ids(ids_S, sizes, spec.id_bytes),
                "topk_values": codec.encode_values(gap_S, tspec.value_scale),
                "topk_max": codec.encode_float32(max_P),
                "lse": codec.encode_float32(lse_PT.reshape(-1))}

    @classmethod
    def decode(cls, cells, spec) -> "TopkRowTargets | None":
        if "topk_max" not in cells:
            return None
        tspec = spec.targets
        max_P = codec.decode_float32(cells["topk_max"], len(cells["topk_max"]) // 4)
        num_pos = len(max_P)
        lse_PT = codec.decode_float32(cells["lse"], num_pos * len(tspec.temperatures)).reshape(
            num_pos, len(tspec.temperatures))
        sizes = np.full(num_pos, tspec.k, dtype=np.int64)
        ids_PK = codec.decode_ids(cells["topk_ids"], sizes, spec.id_bytes).reshape(num_pos, tspec.k)
        gap_PK = codec.decode_values(cells["topk_values"], tspec.value_scale).reshape(num_pos, tspec.k)
        return cls(ids_PK=ids_PK, logits_PK=max_P[:, None] - gap_PK, lse_PT=lse_PT)


@dataclass
class TopkBatchTargets(BatchTargets):
    """A batch's top-k targets for positions 0..L-2. Pads: id 0 (still valid for a gather) and value 0."""

    ids_BPK: Tensor  # int64
    logits_BPK: Tensor  # float32 teacher logits at T=1
    lse_BPT: Tensor  # float32 full-vocabulary logsumexp(logits / T) per cached T

    def fill_row(self, b, row: TopkRowTargets, start: int = 0) -> None:
        where = slice(start, start + row.num_positions)
        self.ids_BPK.numpy()[b, where] = row.ids_PK
        self.logits_BPK.numpy()[b, where] = row.logits_PK
        self.lse_BPT.numpy()[b, where] = row.lse_PT

    def loss_targets(self, n, layout) -> "TopkTargets":
        k = self.ids_BPK.shape[-1]
        return TopkTargets(ids_NK=self.ids_BPK.reshape(n, k), logits_NK=self.logits_BPK.reshape(n, k),
                           lse_NT=self.lse_BPT.reshape(n, -1), lse_index=layout.lse_index)


@register
class TopkKind(TargetKind):
    mode = "topk"
    described = "top-k"
    row_targets = TopkRowTargets

    def check_spec(self, tspec, vocab_size=None) -> None:
        if tspec.k < 1:
            raise ValueError(f"top-k needs k >= 1, got {tspec.k}")
        if not tspec.temperatures or any(t <= 0 for t in tspec.temperatures):
            raise ValueError(f"temperatures must be positive, got {tspec.temperatures}")
        if vocab_size is not None and tspec.k > vocab_size:
            raise ValueError(f"k={tspec.k} exceeds the vocabulary ({vocab_size})")

    def schema_fields(self) -> list[pa.Field]:
        return [pa.field("topk_ids", pa.binary()), pa.field("topk_values", pa.binary()),
                pa.field("topk_max", pa.binary()), pa.field("lse", pa.binary())]

    def bytes_per_token(self, spec) -> float:
        t = spec.targets
        return t.k * (spec.id_bytes + 1) + 4 * (1 + len(t.temperatures))  # ids, value byte, max + lse

    def check_row(self, row, spec, at, num_pos) -> list[str]:
        ids_PK, logits_PK, lse_PT = row.targets.ids_PK, row.targets.logits_PK, row.targets.lse_PT
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
        return problems + _check_lse(logits_PK, lse_PT, spec.targets, at)

    def stats_temperature(self, spec, t_index) -> float:
        return spec.targets.temperatures[t_index]

    def add_statistics(self, stats, row, spec, next_ids_P) -> None:
        t_index, targets = stats.t_index, row.targets
        temperature = spec.targets.temperatures[t_index]
        logp_PK = targets.logits_PK.astype(np.float64) / temperature - targets.lse_PT[:, t_index, None]
        p_PK = np.exp(logp_PK)
        mass_P = p_PK.sum(axis=1)
        tail_P = np.clip(1.0 - mass_P, 0.0, 1.0)
        kept_entropy_P = -(p_PK * logp_PK).sum(axis=1)
        rest = spec.vocab_size - spec.targets.k
        with np.errstate(divide="ignore", invalid="ignore"):
            # Tail tokens are each below the smallest kept probability (lower
            # bound) and at most uniform over the rest of the vocabulary (upper).
            tail_low_P = np.where(tail_P > 0, -tail_P * logp_PK.min(axis=1, initial=0.0), 0.0)
            tail_high_P = np.where(tail_P > 0, tail_P * (np.log(max(rest, 1)) - np.log(tail_P)), 0.0)
        stats.add_values("top1_prob", p_PK.max(axis=1, initial=0.0))
        stats.add_values("topk_mass", mass_P)
        stats.add_values("tail_mass", tail_P)
        stats.add_values("entropy_lower", kept_entropy_P + tail_low_P)
        stats.add_values("entropy_upper", kept_entropy_P + tail_high_P)
        stats.add_flags("next_token_in_topk", (targets.ids_PK == next_ids_P[:, None]).any(axis=1))
        top1_ids_P = targets.ids_PK[np.arange(len(p_PK)), p_PK.argmax(axis=1)] if len(p_PK) else next_ids_P
        stats.add_flags("next_token_is_top1", top1_ids_P == next_ids_P)

    def position_entries(self, row, spec) -> list[dict]:
        temps, targets = spec.targets.temperatures, row.targets
        entries = []
        for t in range(row.num_positions):
            order = np.argsort(-targets.logits_PK[t], kind="stable")
            logits_K = targets.logits_PK[t][order].astype(np.float64)
            entries.append({
                "ids": targets.ids_PK[t][order].tolist(),
                "logits": logits_K.tolist(),
                "logprobs": {str(T): (logits_K / T - float(targets.lse_PT[t, i])).tolist() for i, T in enumerate(temps)},
                "lse": {str(T): float(targets.lse_PT[t, i]) for i, T in enumerate(temps)},
            })
        return entries

    def describe(self, tspec) -> str:
        return f"top-{tspec.k}, log-sum-exp at T={', '.join(f'{x:g}' for x in tspec.temperatures)}"

    def describe_recorded(self, targets) -> str:
        return f"top-k k={targets['k']}, T={targets['temperatures']}"

    def position_shares(self, entry, targets, top) -> list[str]:
        # Probabilities at T=1 when stored, else at the first stored temperature.
        key = "1.0" if "1.0" in entry["logprobs"] else next(iter(entry["logprobs"]))
        return [f"{math.exp(lp):.3f}" for lp in entry["logprobs"][key][:top]]

    def batch_targets(self, rows, spec, B, P, full) -> TopkBatchTargets:
        k, num_temps = spec.targets.k, len(spec.targets.temperatures)
        return TopkBatchTargets(ids_BPK=full((B, P, k), 0, torch.int64),
                                logits_BPK=full((B, P, k), 0.0, torch.float32),
                                lse_BPT=full((B, P, num_temps), 0.0, torch.float32))

    def synthetic_batch_targets(self, spec, B, P, gen) -> TopkBatchTargets:
        t, V = spec.targets, spec.vocab_size
        offset_BP1 = torch.randint(0, V, (B, P, 1), generator=gen)
        logits_BPK = torch.randn(B, P, t.k, generator=gen)
        return TopkBatchTargets(ids_BPK=(offset_BP1 + torch.arange(t.k)) % V,  # distinct per position
                                logits_BPK=logits_BPK,
                                lse_BPT=torch.logsumexp(logits_BPK, -1, keepdim=True).expand(
                                    B, P, len(t.temperatures)) + 1.0)

    def stand_in_spec(self, kl_temperature):
        from common.spec import TargetSpec  # here: common.spec imports the kinds

        return TargetSpec(k=64, temperatures=tuple(sorted({1.0, kl_temperature})))


def _check_lse(logits_PK: np.ndarray, lse_PT: np.ndarray, tspec, at: str) -> list[str]:
    problems = []
    max_P = logits_PK.max(axis=1).astype(np.float64)
    # Smallest true logits consistent with the stored codes: their
    # log-sum-exp is a floor the full-vocabulary lse can never be under.
    gap_hi_PK = codec.gap_upper_bound(max_P[:, None] - logits_PK, tspec.value_scale)
    for ti, temperature in enumerate(tspec.temperatures):
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


@dataclass(frozen=True)
class TopkTargets:
    """Top-k targets as the loss reads them."""

    ids_NK: Tensor  # int64, distinct per row, any order
    logits_NK: Tensor  # float32 teacher logits at T=1
    lse_NT: Tensor  # float32 full-vocabulary logsumexp(teacher_logits / T), one column per cached T
    lse_index: int  # the column of lse_NT whose T is the KL temperature

    cache_mode: ClassVar[str] = TopkKind.mode
    described: ClassVar[str] = TopkKind.described

    def rows(self, index) -> "TopkTargets":
        return dataclasses.replace(self, ids_NK=self.ids_NK[index], logits_NK=self.logits_NK[index],
                                   lse_NT=self.lse_NT[index])

    def teacher_top1_N(self) -> Tensor:
        return self.ids_NK.gather(1, self.logits_NK.argmax(-1, keepdim=True)).squeeze(1)

    def check(self, n: int, vocab: int) -> None:
        if self.lse_NT.dim() != 2 or self.lse_NT.shape[0] != n:
            raise ValueError(f"teacher lse must be [{n}, T], got {tuple(self.lse_NT.shape)}")
        if not 0 <= self.lse_index < self.lse_NT.shape[1]:
            raise ValueError(f"lse_index {self.lse_index} out of range for {self.lse_NT.shape[1]} "
                             "cached temperatures")
        check_target_ids(self.ids_NK, self.logits_NK, n, vocab, lowest_id=0)


def check_target_ids(ids, values, n: int, vocab: int, lowest_id: int) -> None:
    """Loss targets' ids: int64 [n, K] with values of the same shape, inside [lowest_id, vocab)."""
    if ids.dim() != 2 or ids.shape[0] != n or values.shape != ids.shape or ids.dtype != torch.int64:
        raise ValueError(f"teacher ids must be int64 [{n}, K] with values of the same shape, got "
                         f"{ids.dtype} {tuple(ids.shape)} and {tuple(values.shape)}")
    if bool(((ids < lowest_id) | (ids >= vocab)).any()):
        raise ValueError(f"teacher ids must be in [{lowest_id}, {vocab})")
