"""Target kinds: what a cache stores per position about the teacher's next token.

A kind owns everything that depends on it: its shard columns and the coding of
a row's target cells, its bytes per token, the checks and statistics of a
decoded row, its collation into a training batch and the loss targets built
from that batch. The rest of the code asks `TargetSpec.kind` and never tests
the mode. A new kind is one module here with a `@register`ed `TargetKind`
subclass, imported at the bottom of this file.

Shape suffixes: L tokens, P = L - 1 target positions (position t describes
token t + 1), B batch rows, N flattened batch positions.
"""

from __future__ import annotations

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


class TargetKind:
    mode: ClassVar[str]  # TargetSpec.mode, as recorded in every shard and manifest
    described: ClassVar[str]  # in messages: "a top-k cache"

    def check_spec(self, tspec: "TargetSpec", vocab_size: int | None = None) -> None:
        """ValueError for settings this kind cannot store (vocab_size: once the spec has one)."""

    def schema_fields(self) -> list[pa.Field]:
        raise NotImplementedError

    def encode(self, row: "TeacherRow", spec: "ShardSpec", where: str) -> dict:
        """A row's target cells, {column: cell}; ValueError naming `where` for bad shapes or ids."""
        raise NotImplementedError

    def decode(self, cells: dict, spec: "ShardSpec", row: "TeacherRow") -> None:
        """Sets the row's target arrays from its cells, when the reader read them."""
        raise NotImplementedError

    def bytes_per_token(self, spec: "ShardSpec") -> float:
        """Uncompressed target bytes per token (an upper bound where the size varies)."""
        raise NotImplementedError

    def num_positions(self, row: "TeacherRow") -> int:
        """Target positions the row's decoded targets cover."""
        raise NotImplementedError

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

    def batch_fields(self, rows: list["TeacherRow"], spec: "ShardSpec", B: int, P: int,
                     full: Allocate) -> dict[str, torch.Tensor]:
        """The batch's target tensors, filled with padding: {StudentBatch field: tensor}."""
        raise NotImplementedError

    def fill_row(self, batch, b: int, row: "TeacherRow", start: int = 0) -> None:
        """Copies one row's targets into batch row b from position `start` on (packed
        batches hold several rows), through numpy views (the decode
        threads' copies then run without the GIL; see student_train/loader.py)."""
        raise NotImplementedError

    def loss_targets(self, batch, n: int, layout):
        """The batch's targets over its n flattened positions, as the loss reads them (None: none loaded)."""
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
