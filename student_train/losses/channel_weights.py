"""`loss.channel_weights`: CE and KL weighted per token by its channel (prompt, analysis,
final, unknown; common.row_columns), for caches that store channels. All 1 (the default)
is the unweighted loss exactly: no weights are computed at all.

The loss is sum_t w_t (CE_t + KL_t) / sum_t w_t, both sums over every rank's and micro
batch's valid positions, so the normaliser is the weighted token count, as the trainer's
count is the plain one. Position t takes the channel of token t + 1, which it predicts.
Shape suffixes: B rows, P = L - 1 positions.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import torch

from common.causal_lm import IGNORE_INDEX
from common.row_columns import CHANNEL_NAMES

NEEDS_CHANNELS = ("loss.channel_weights needs a cache that stores channels (cache-teacher reads them from the "
                  "dataset's 'spans' column); this cache has none")


def check_weight(key: str, value) -> None:
    """A loss weight: a finite number >= 0, or a ValueError naming its key."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class ChannelWeights:
    prompt: float = 1.0
    analysis: float = 1.0
    final: float = 1.0
    unknown: float = 1.0

    def __post_init__(self):
        for name in CHANNEL_NAMES:
            check_weight(f"channel_weights.{name}", getattr(self, name))

    @property
    def uniform(self) -> bool:
        return all(getattr(self, name) == 1.0 for name in CHANNEL_NAMES)

    def table_C(self) -> tuple[float, ...]:
        """The weights by channel code."""
        return tuple(float(getattr(self, name)) for name in CHANNEL_NAMES)


assert tuple(f.name for f in fields(ChannelWeights)) == CHANNEL_NAMES, "one weight per channel code, in code order"


def position_weights_BP(batch, weights: ChannelWeights, dtype=torch.float64) -> torch.Tensor | None:
    """Each position's weight (that of the channel of the token it predicts), or None when
    the weights are all 1. A ValueError for a batch from a cache without channels."""
    if weights.uniform:
        return None
    channels_BP = batch.target_channels_BP()
    if channels_BP is None:
        raise ValueError(NEEDS_CHANNELS)
    table_C = _device_table(weights, dtype, channels_BP.device)
    return table_C[channels_BP.clamp(min=0)]  # pads (-1) are masked by their labels


@functools.cache
def _device_table(weights: ChannelWeights, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The weights by channel code on `device`, made once: not a host-to-device copy per micro batch."""
    return torch.tensor(weights.table_C(), dtype=dtype, device=device)


def weighted_valid_tokens(batch, weights: ChannelWeights) -> torch.Tensor:
    """The normaliser's share of one micro batch: the valid positions, each counted with its weight."""
    valid_BP = batch.target_labels_BP() != IGNORE_INDEX
    weights_BP = position_weights_BP(batch, weights)
    return valid_BP.sum() if weights_BP is None else (weights_BP * valid_BP).sum()
