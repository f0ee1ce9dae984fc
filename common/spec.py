"""What a cache holds: the target and hidden-state settings recorded in every
shard's schema metadata and in the manifest. Both stages import these."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import numpy as np

from common import row_columns
from common.codec import DEFAULT_VALUE_SCALE, id_bytes_for_vocab
from common.targets import KINDS, TargetKind, target_kind

FORMAT_VERSION = 2  # what this build writes
# Format 1 shards (no row checksums) are still read; see docs/FORMAT.md, Versions.
READABLE_FORMAT_VERSIONS = (1, 2)
ROW_CHECKSUMS_SINCE = 2
TARGET_MODES = tuple(KINDS)
HIDDEN_DTYPES = ("bf16", "fp8")


@dataclass(frozen=True)
class TargetSpec:
    """Per-position teacher targets. Position t describes token t+1."""

    mode: str = "topk"
    k: int = 64
    # log-sum-exp of logits / T over the full vocabulary is stored for each T.
    temperatures: tuple[float, ...] = (1.0, 2.0)
    num_samples: int = 0  # sampled mode: N draws with replacement at T=1
    seed: int = 0  # sampled mode: draws for row r use (seed, r) only
    value_scale: float = DEFAULT_VALUE_SCALE

    def __post_init__(self):
        if self.mode not in TARGET_MODES:
            raise ValueError(f"target mode must be one of {TARGET_MODES}, got {self.mode!r}")
        self.kind.check_spec(self)

    @property
    def kind(self) -> TargetKind:
        """What depends on the mode: columns, coding, checks, collation (common/targets/)."""
        return target_kind(self.mode)

    @property
    def count_bytes(self) -> int:
        return 1 if self.num_samples <= 255 else 2


@dataclass(frozen=True)
class HiddenSpec:
    """Which teacher layers' residual streams are stored, and how.

    Layer i is the stream leaving decoder layer i (1-based), before the final norm.
    Hidden states are not shifted: stored position t is token t's state.
    """

    layers: tuple[int, ...] = ()
    dtype: str = "bf16"
    token_fraction: float = 1.0
    hidden_size: int = 0
    seed: int = 0  # which positions are kept when token_fraction < 1

    def __post_init__(self):
        if self.dtype not in HIDDEN_DTYPES:
            raise ValueError(f"hidden dtype must be one of {HIDDEN_DTYPES}, got {self.dtype!r}")
        if not (0.0 < self.token_fraction <= 1.0):
            raise ValueError(f"hidden token fraction must be in (0, 1], got {self.token_fraction}")
        if any(layer < 1 for layer in self.layers):
            raise ValueError(f"hidden layers are 1-based, got {self.layers}")
        if self.layers and self.hidden_size < 1:
            raise ValueError("hidden_size must be set when hidden layers are stored")

    @property
    def subset(self) -> bool:
        return self.token_fraction < 1.0


@dataclass(frozen=True)
class ShardSpec:
    vocab_size: int
    targets: TargetSpec = field(default_factory=TargetSpec)
    hidden: HiddenSpec = field(default_factory=HiddenSpec)
    format_version: int = FORMAT_VERSION
    # Optional per-row columns from the dataset (common.row_columns): absent from the spec's
    # JSON when empty, so a cache without them is byte for byte what it was before them.
    columns: tuple[str, ...] = field(default=(), metadata={"optional": True})

    def __post_init__(self):
        if self.format_version not in READABLE_FORMAT_VERSIONS:
            raise ValueError(f"unknown format version {self.format_version!r} (this build reads "
                             f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))})")
        row_columns.check_columns(self.columns)
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        self.targets.kind.check_spec(self.targets, self.vocab_size)

    @property
    def row_checksums(self) -> bool:
        """Whether each row carries a checksum of every cell (format 2 on)."""
        return self.format_version >= ROW_CHECKSUMS_SINCE

    @property
    def id_bytes(self) -> int:
        return id_bytes_for_vocab(self.vocab_size)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.columns:
            del d["columns"]
        else:
            d["columns"] = list(self.columns)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ShardSpec":
        try:
            targets = dict(d["targets"])
            targets["temperatures"] = tuple(targets.get("temperatures", ()))
            hidden = dict(d["hidden"])
            hidden["layers"] = tuple(hidden.get("layers", ()))
            return cls(
                vocab_size=int(d["vocab_size"]),
                targets=TargetSpec(**targets),
                hidden=HiddenSpec(**hidden),
                format_version=int(d["format_version"]),
                columns=tuple(d.get("columns", ())),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"shard spec is missing or has an unknown key: {exc}") from exc


def content_hash(input_ids: np.ndarray) -> bytes:
    """16-byte key of a row's tokens; the trainer checks it against its data."""
    return hashlib.blake2b(np.ascontiguousarray(input_ids, dtype="<i4").tobytes(), digest_size=16).digest()


def hidden_positions(row_id: int, length: int, fraction: float, seed: int) -> np.ndarray:
    """Deterministic sorted subset of positions kept for hidden states.

    Depends only on (seed, row_id, length), never on batching or workers.
    """
    if fraction >= 1.0:
        return np.arange(length, dtype=np.int32)
    keep = max(1, int(round(fraction * length))) if length else 0
    rng = np.random.Generator(np.random.PCG64([seed, row_id, 0x48494444]))
    return np.sort(rng.choice(length, size=keep, replace=False)).astype(np.int32)
