"""Dense targets: the teacher's full distribution, rebuilt chunk by chunk from its cached
last-layer hidden state through its own final norm and lm_head (`kl_mode: dense`).

The stored hidden state of token n is the teacher's residual stream after reading tokens
0..n, so its logits describe token n + 1: flattened position n of the loss (already shifted,
see student_train/losses/__init__.py) takes the teacher hidden state of the same n.
Positions without a stored state (a hidden token fraction < 1) use the cache's own targets
(`fallback`) or are skipped. Shape suffixes as in student_train/losses/__init__.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from common.teacher_head import TeacherHead
from student_train.losses.targets import SampledTargets, TopkTargets

DENSE_FALLBACKS = ("targets", "skip")


@dataclass(frozen=True)
class DenseTargets:
    hidden_NE: Tensor  # the teacher's last-layer stream at position n (float), zeros where not stored
    has_hidden_N: Tensor  # bool: a hidden state is stored at n
    head: TeacherHead  # frozen, on the loss's device
    fallback: TopkTargets | SampledTargets  # the cache's targets: positions without a state, top-1 agreement
    skip_missing: bool  # positions without a state get no KL instead of the fallback's

    cache_mode: ClassVar[str] = "dense"
    described: ClassVar[str] = "dense (last-layer hidden state + teacher head)"

    def rows(self, index) -> "DenseTargets":
        return dataclasses.replace(self, hidden_NE=self.hidden_NE[index], has_hidden_N=self.has_hidden_N[index],
                                   fallback=self.fallback.rows(index))

    def teacher_top1_N(self) -> Tensor:
        return self.fallback.teacher_top1_N()

    def check(self, n: int, vocab: int) -> None:
        width = self.head.width
        if self.hidden_NE.shape != (n, width) or self.has_hidden_N.shape != (n,) or self.has_hidden_N.dtype != torch.bool:
            raise ValueError(f"dense targets need hidden [{n}, {width}] and a bool mask [{n}], got "
                             f"{tuple(self.hidden_NE.shape)} and {self.has_hidden_N.dtype} {tuple(self.has_hidden_N.shape)}")
        if self.head.vocab_size != vocab:
            raise ValueError(f"the teacher's lm_head has {self.head.vocab_size} rows, the student's {vocab}")
        self.fallback.check(n, vocab)
