"""Target kinds: what a cache stores per position about the teacher's next token.

A kind owns everything that depends on it: its shard columns and the coding of
a row's target cells, its bytes per token, the checks and statistics of a
decoded row, its collation into a training batch and the loss targets built
from that batch. A row (`TeacherRow.targets`) and a batch (`StudentBatch.targets`)
each carry one object of the kind's own `RowTargets` / `BatchTargets` subclass.
The rest of the code asks `TargetSpec.kind` or those objects and never tests
the mode. A new kind is one module here with a `@register`ed `TargetKind`
subclass and its two target classes, imported at the bottom of this file.

Shape suffixes: L tokens, P = L - 1 target positions (position t describes
token t + 1), B batch rows, N flattened batch positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import pyarrow as pa
import torch

if TYPE_CHECKING:
    from common.shard_format import TeacherRow
    from common.spec import ShardSpec, TargetSpec

# full(shape, fill value, dtype) -> a tensor in the loader's memory (pinned or shared)
Allocate = Callable[[tuple, object, torch.dtype], torch.Tensor]


class RowTargets:
    """One row's decoded targets (numpy arrays), as `TeacherRow.targets` holds them."""

    @property
    def num_positions(self) -> int:
        """Target positions the targets cover."""
        raise NotImplementedError

    def encode(self, spec: "ShardSpec", num_positions: int, where: str) -> dict:
        """The target cells, {column: cell}; ValueError naming `where` for bad shapes or ids."""
        raise NotImplementedError

    @classmethod
    def decode(cls, cells: dict, spec: "ShardSpec") -> "RowTargets | None":
        """The targets from a row's cells; None when the reader did not read them."""
        raise NotImplementedError


class BatchTargets:
    """A batch's targets (tensors [B, P, ...], padded), as `StudentBatch.targets` holds them.
    Subclasses are dataclasses whose fields are all tensors."""

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "BatchTargets":
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def to(self, device, non_blocking: bool = False) -> "BatchTargets":
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "BatchTargets":
        return self.map(lambda t: t if t.is_pinned() else t.pin_memory())

    def fill_row(self, b: int, row: RowTargets, start: int = 0) -> None:
        """Copies one row's targets into batch row b from position `start` on (packed
        batches hold several rows), through numpy views (the decode
        threads' copies then run without the GIL; see student_train/loader.py)."""
        raise NotImplementedError

    def loss_targets(self, n: int, layout):
        """The targets over the batch's n flattened positions, as the loss reads them."""
        raise NotImplementedError


class TargetKind:
    mode: ClassVar[str]  # TargetSpec.mode, as recorded in every shard and manifest
    described: ClassVar[str]  # in messages: "a top-k cache"
    row_targets: ClassVar[type[RowTargets]]

    def check_spec(self, tspec: "TargetSpec", vocab_size: int | None = None) -> None:
        """ValueError for settings this kind cannot store (vocab_size: once the spec has one)."""

    def schema_fields(self) -> list[pa.Field]:
        raise NotImplementedError

    def encode(self, row: "TeacherRow", spec: "ShardSpec", where: str) -> dict:
        """A row's target cells, {column: cell}; ValueError naming `where` for bad shapes or ids."""
        if not isinstance(row.targets, self.row_targets):
            raise ValueError(f"{where}: {self.described} cache needs {self.row_targets.__name__}, "
                             f"got {type(row.targets).__name__}")
        return row.targets.encode(spec, row.num_positions, where)

    def decode(self, cells: dict, spec: "ShardSpec", row: "TeacherRow") -> None:
        """Sets the row's targets from its cells, when the reader read them."""
        row.targets = self.row_targets.decode(cells, spec)

    def bytes_per_token(self, spec: "ShardSpec") -> float:
        """Uncompressed target bytes per token (an upper bound where the size varies)."""
        raise NotImplementedError

    def num_positions(self, row: "TeacherRow") -> int:
        """Target positions the row's decoded targets cover."""
        return row.targets.num_positions

    def check_row(self, row: "TeacherRow", spec: "ShardSpec", at: str, num_pos: int) -> list[str]:
        """Every rule a decoded row's targets can break; one line each, starting with `at`."""
        raise NotImplementedError

    def stats_temperature(self, spec: "ShardSpec", t_index: int) -> float:
        return 1.0

    def add_statistics(self, stats, row: "TeacherRow", spec: "ShardSpec", next_ids_P: np.ndarray) -> None:
        """Per-position values (`stats.add_values`) and flags (`stats.add_flags`) of one row."""
        raise NotImplementedError

    def position_entries(self, row: "TeacherRow", spec: "ShardSpec") -> list[dict]:
        """Each position's targets, readable: ids first."""
        raise NotImplementedError

    def describe(self, tspec: "TargetSpec") -> str:
        """The settings in a sentence, as a cache run's plan prints them."""
        raise NotImplementedError

    def describe_recorded(self, targets: dict) -> str:
        """The settings as recorded in a manifest's spec (`TargetSpec.to_dict`), in short."""
        raise NotImplementedError

    def position_shares(self, entry: dict, targets: dict, top: int) -> list[str]:
        """Each of the first `top` ids' share of a `position_entries` entry, readable."""
        raise NotImplementedError

    def batch_targets(self, rows: list["TeacherRow"], spec: "ShardSpec", B: int, P: int,
                      full: Allocate) -> BatchTargets:
        """The batch's targets filled with padding, for `BatchTargets.fill_row` to fill."""
        raise NotImplementedError

    def synthetic_batch_targets(self, spec: "ShardSpec", B: int, P: int, gen: torch.Generator) -> BatchTargets:
        """Every target slot filled with valid values: the most memory a real batch can take (autotune)."""
        raise NotImplementedError

    def stand_in_spec(self, kl_temperature: float) -> "TargetSpec":
        """Targets of a typical cache of this kind, for sizing a run before its cache exists."""
        raise NotImplementedError


KINDS: dict[str, TargetKind] = {}


def register(cls: type[TargetKind]) -> type[TargetKind]:
    KINDS[cls.mode] = cls()
    return cls


def target_kind(mode: str) -> TargetKind:
    try:
        return KINDS[mode]
    except KeyError:
        raise ValueError(f"target mode must be one of {tuple(KINDS)}, got {mode!r}") from None


from common.targets import topk, sampled  # noqa: F401,I001  registers the kinds; this order is TARGET_MODES'
