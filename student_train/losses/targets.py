"""The teacher's targets as the loss reads them: top-k logits with log-sum-exps, or sampled ids and counts.

Each class names the cache targets mode it comes from (`cache_mode`), which is how a divergence
says which cache it needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor


def lse_column(temperatures, kl_temperature: float) -> int | None:
    """Which cached log-sum-exp temperature is the KL temperature (None: not cached)."""
    return next((i for i, t in enumerate(temperatures) if abs(t - kl_temperature) < 1e-6), None)


@dataclass(frozen=True)
class TopkTargets:
    ids_NK: Tensor  # int64, distinct per row, any order
    logits_NK: Tensor  # float32 teacher logits at T=1
    lse_NT: Tensor  # float32 full-vocabulary logsumexp(teacher_logits / T), one column per cached T
    lse_index: int  # the column of lse_NT whose T is the KL temperature

    cache_mode: ClassVar[str] = "topk"
    described: ClassVar[str] = "top-k"

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
        _check_ids(self.ids_NK, self.logits_NK, n, vocab, lowest_id=0)


@dataclass(frozen=True)
class SampledTargets:
    ids_NM: Tensor  # int64 distinct sampled ids, padded with -1
    counts_NM: Tensor  # draws per id, 0 where padded
    num_samples: int  # draws per position (N_s); the target probability is count / N_s

    cache_mode: ClassVar[str] = "sampled"
    described: ClassVar[str] = "sampled"

    def rows(self, index) -> "SampledTargets":
        return dataclasses.replace(self, ids_NM=self.ids_NM[index], counts_NM=self.counts_NM[index])

    def teacher_top1_N(self) -> Tensor:
        return self.ids_NM.gather(1, self.counts_NM.argmax(-1, keepdim=True)).squeeze(1)

    def check(self, n: int, vocab: int) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        _check_ids(self.ids_NM, self.counts_NM, n, vocab, lowest_id=-1)  # -1: padding


Targets = TopkTargets | SampledTargets


def _check_ids(ids, values, n: int, vocab: int, lowest_id: int) -> None:
    if ids.dim() != 2 or ids.shape[0] != n or values.shape != ids.shape or ids.dtype != torch.int64:
        raise ValueError(f"teacher ids must be int64 [{n}, K] with values of the same shape, got "
                         f"{ids.dtype} {tuple(ids.shape)} and {tuple(values.shape)}")
    if bool(((ids < lowest_id) | (ids >= vocab)).any()):
        raise ValueError(f"teacher ids must be in [{lowest_id}, {vocab})")
