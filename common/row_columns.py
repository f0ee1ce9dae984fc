"""Optional per-row columns carried from the dataset into a shard: the dataset's
own row id, the row's source name and a per-token channel (see docs/FORMAT.md,
"Optional row columns"). A cache stores the ones its spec lists in `columns`;
a cache without them is byte for byte what it was before they existed.

Channels are per token (not per target position): token t's channel says
which part of the conversation it belongs to, so the target at position t
(which predicts token t + 1) takes token t + 1's channel, like its label.

Shape suffixes: L tokens of a row.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

DATASET_ID = "dataset_id"
SOURCE = "source"
CHANNELS = "channels"
# In schema order (after the token columns); a spec's `columns` is a subset in this order.
ROW_COLUMNS = (DATASET_ID, SOURCE, CHANNELS)

# Channel codes: the byte stored per token.
CHANNEL_NAMES = ("prompt", "analysis", "final", "unknown")
PROMPT, ANALYSIS, FINAL, UNKNOWN = range(len(CHANNEL_NAMES))


def check_columns(columns: tuple[str, ...]) -> None:
    unknown = [c for c in columns if c not in ROW_COLUMNS]
    if unknown:
        raise ValueError(f"unknown row column(s) {', '.join(map(repr, unknown))} (known: {', '.join(ROW_COLUMNS)})")
    if tuple(c for c in ROW_COLUMNS if c in columns) != tuple(columns):
        raise ValueError(f"row columns {list(columns)} must be distinct and in the order {', '.join(ROW_COLUMNS)}")


def schema_fields(columns: tuple[str, ...]) -> list[pa.Field]:
    types = {DATASET_ID: pa.string(), SOURCE: pa.string(), CHANNELS: pa.binary()}
    return [pa.field(name, types[name]) for name in columns]


def channels_from_spans(num_tokens: int, assistant_start: int, analysis_count: int, final_count: int) -> np.ndarray:
    """uint8 [L]: prompt before `assistant_start`, then `analysis_count` analysis
    tokens, then `final_count` final ones; tokens after the spans are unknown.
    The caller checks that the spans fit (`spans_fit`)."""
    assert spans_fit(num_tokens, assistant_start, analysis_count, final_count)
    channels_L = np.full(num_tokens, UNKNOWN, dtype=np.uint8)
    analysis_end = assistant_start + analysis_count
    channels_L[:assistant_start] = PROMPT
    channels_L[assistant_start:analysis_end] = ANALYSIS
    channels_L[analysis_end:analysis_end + final_count] = FINAL
    return channels_L


def spans_fit(num_tokens, assistant_start, analysis_count, final_count):
    """Whether spans lie inside a row of `num_tokens` (scalars or arrays, element-wise)."""
    return ((assistant_start >= 0) & (analysis_count >= 0) & (final_count >= 0)
            & (assistant_start + analysis_count + final_count <= num_tokens))


def unknown_channels(num_tokens: int) -> np.ndarray:
    return np.full(num_tokens, UNKNOWN, dtype=np.uint8)


def encode_channels(channels_L: np.ndarray, num_tokens: int, where: str) -> np.ndarray:
    """The stored cell: one byte per token (zstd makes the long runs almost free)."""
    channels_L = np.asarray(channels_L)
    if channels_L.shape != (num_tokens,):
        raise ValueError(f"{where}: channels has shape {channels_L.shape}, expected ({num_tokens},)")
    _check_codes(channels_L, where)
    return np.ascontiguousarray(channels_L, dtype=np.uint8)


def decode_channels(cell, num_tokens: int | None, where: str) -> np.ndarray:
    channels_L = np.frombuffer(cell, dtype=np.uint8)
    if num_tokens is not None and len(channels_L) != num_tokens:
        raise ValueError(f"{where}: channels holds {len(channels_L)} tokens, the row {num_tokens}")
    # A code past the table would index past the loss's channel weights: refused on every read.
    _check_codes(channels_L, where)
    return channels_L


def _check_codes(channels_L: np.ndarray, where: str) -> None:
    if channels_L.size and int(channels_L.max()) >= len(CHANNEL_NAMES):
        raise ValueError(f"{where}: channel code {int(channels_L.max())} is not one of 0..{len(CHANNEL_NAMES) - 1}")


def channel_counts(channels_L: np.ndarray) -> dict[str, int]:
    counts = np.bincount(np.asarray(channels_L, dtype=np.int64), minlength=len(CHANNEL_NAMES))
    return {name: int(n) for name, n in zip(CHANNEL_NAMES, counts)}
