"""Compact encodings for teacher targets and hidden states (shard formats 1 and 2).

Every encoder here maps numpy arrays to a `bytes` blob that goes into one Arrow
binary cell; Arrow then zstd-compresses whole column buffers. The encoders only
rearrange data so that zstd finds the redundancy:

* ids: sorted ascending inside each group (a position's top-k or its sampled
  ids) and delta-coded, then split into byte planes (all low bytes, then all
  middle bytes, ...). Deltas are small, so the high planes are nearly constant.
* top-k values: stored as `d = max_logit - logit >= 0` in one byte through a
  companding law `code = round(255 * exp(-d / s))`. The step in `d` grows like
  `exp(d / s)` while the token's probability falls like `exp(-d)`, so each
  token's contribution to the KL error shrinks as its probability does.
* float32 / bf16 arrays: byte planes (the sign/exponent planes compress well).
* hidden states in fp8 e4m3 with a per-token scale `amax / 448`.

Shape suffixes: P positions, K top-k width, S flattened sampled entries,
H stored hidden positions, D hidden size.
"""

from __future__ import annotations

import math

import numpy as np
import torch

VALUE_LEVELS = 255
# Companding scale `s` (nats). 3.0 keeps the mean KL error (k ids + tail
# bucket) at 2.5-4.8e-5 nats at T=1 for k = 32..128 on peaked distributions
# (bench/codec_bench.py, docs/BENCHMARKS.md) and clamps logits more than
# about 18.7 nats below the maximum, whose probability is below 1e-8.
DEFAULT_VALUE_SCALE = 3.0
FP8_E4M3_MAX = 448.0


def id_bytes_for_vocab(vocab_size: int) -> int:
    """Bytes per id needed for the vocabulary (3 for V = 201,088: 18 bits)."""
    assert vocab_size > 0
    return max(1, math.ceil(math.log2(max(vocab_size, 2)) / 8))


def to_planes(arr: np.ndarray, nbytes: int) -> bytes:
    """Little-endian integer/float array -> byte planes (plane 0 = lowest byte)."""
    return plane_array(arr, nbytes).tobytes()


def plane_array(arr: np.ndarray, nbytes: int) -> np.ndarray:
    """`to_planes` as a flat uint8 array. Megabyte cells (hidden states) skip the
    `bytes` copy, which costs more than the plane split and holds the GIL; the
    shard writer hands any buffer to Arrow."""
    raw = np.ascontiguousarray(arr).view(np.uint8).reshape(-1, arr.dtype.itemsize)
    return np.ascontiguousarray(raw[:, :nbytes].T).reshape(-1)


def from_planes(blob: bytes, nbytes: int, dtype: np.dtype, count: int) -> np.ndarray:
    dtype = np.dtype(dtype)
    if len(blob) != nbytes * count:
        raise ValueError(f"byte-plane blob holds {len(blob)} bytes, expected {nbytes * count}")
    planes = np.frombuffer(blob, dtype=np.uint8).reshape(nbytes, count)
    out = np.zeros((count, dtype.itemsize), dtype=np.uint8)
    out[:, :nbytes] = planes.T
    return out.view(dtype).reshape(count)


def sort_groups(ids_S: np.ndarray, group_sizes: np.ndarray, *payloads: np.ndarray):
    """Sort ids ascending within each group, carrying payload arrays along."""
    group_sizes = np.asarray(group_sizes)
    if len(group_sizes) and (group_sizes == group_sizes[0]).all() and group_sizes[0] > 0:
        # Equal groups (top-k): one short sort per row, far faster than a global sort.
        width = int(group_sizes[0])
        order = np.argsort(ids_S.reshape(-1, width), axis=1, kind="stable")
        order = (order + np.arange(0, len(ids_S), width)[:, None]).reshape(-1)
    else:
        # Ragged groups (sampled): one sort on (group, id) packed into an int64 key.
        group_of_S = np.repeat(np.arange(len(group_sizes), dtype=np.int64), group_sizes)
        span = int(ids_S.max()) + 1 if len(ids_S) else 1
        order = np.argsort(group_of_S * span + ids_S, kind="stable")
    return (ids_S[order],) + tuple(p[order] for p in payloads)


def encode_ids(ids_S: np.ndarray, group_sizes: np.ndarray, id_bytes: int) -> bytes:
    """Delta-code ids that are sorted ascending within each group; byte planes."""
    ids_S = ids_S.astype(np.int64, copy=False)
    deltas_S = np.diff(ids_S, prepend=0)
    starts = np.cumsum(group_sizes) - group_sizes
    starts = starts[group_sizes > 0]
    deltas_S[starts] = ids_S[starts]
    assert (deltas_S >= 0).all(), "ids must be sorted within each group"
    return to_planes(deltas_S.astype(np.uint32), id_bytes)


def decode_ids(blob: bytes, group_sizes: np.ndarray, id_bytes: int) -> np.ndarray:
    count = int(group_sizes.sum())
    deltas_S = from_planes(blob, id_bytes, np.uint32, count).astype(np.int64)
    if count == 0:
        return deltas_S
    # Cumulative sum restarted at each group start: subtract the running total
    # reached just before the group.
    total_S = np.cumsum(deltas_S)
    starts = np.cumsum(group_sizes) - group_sizes
    before_group = np.repeat(total_S[starts[group_sizes > 0]] - deltas_S[starts[group_sizes > 0]],
                             group_sizes[group_sizes > 0])
    return total_S - before_group


def encode_values(gap_S: np.ndarray, scale: float = DEFAULT_VALUE_SCALE) -> bytes:
    """`gap = max_logit - logit >= 0` (nats) -> one companded byte each."""
    code = np.rint(VALUE_LEVELS * np.exp(-np.maximum(gap_S, 0.0).astype(np.float64) / scale))
    return code.astype(np.uint8).tobytes()


def decode_values(blob: bytes, scale: float = DEFAULT_VALUE_SCALE) -> np.ndarray:
    code = np.frombuffer(blob, dtype=np.uint8).astype(np.float64)
    # Code 0 means "below the smallest level": decode to the middle of that bin.
    code = np.maximum(code, 0.25)
    return (-scale * np.log(code / VALUE_LEVELS)).astype(np.float32)


def value_error_bound(gap_S: np.ndarray, scale: float = DEFAULT_VALUE_SCALE) -> np.ndarray:
    """Largest |decoded - true| gap for each true gap (the format's stated bound).

    A true gap maps to x = exp(-gap/s) * 255 in [c - 1/2, c + 1/2] for its code c,
    so the decoded gap is off by at most s * ln(c / (c - 1/2)) for c >= 1. Gaps
    that round to code 0 (more than s * ln(510) nats below the maximum) are
    clamped; their bound is the distance to the clamp value.
    """
    code = np.rint(VALUE_LEVELS * np.exp(-np.maximum(gap_S, 0.0) / scale))
    bound = scale * np.log(np.maximum(code, 1.0) / np.maximum(code - 0.5, 0.5))
    clamp = -scale * math.log(0.25 / VALUE_LEVELS)
    return np.where(code >= 1, bound, np.abs(clamp - gap_S))


def gap_upper_bound(gap_decoded_S: np.ndarray, scale: float = DEFAULT_VALUE_SCALE) -> np.ndarray:
    """Largest true gap that encodes to the same code as each decoded gap.

    Code c >= 1 holds true gaps up to s * ln(255 / (c - 1/2)); code 0 (clamped)
    holds everything further out, so its bound is infinite. Lets a verifier
    bound the true top-k logits from below without the original values.
    """
    code = np.rint(VALUE_LEVELS * np.exp(-np.asarray(gap_decoded_S, dtype=np.float64) / scale))
    with np.errstate(divide="ignore"):
        return np.where(code >= 1, -scale * np.log(np.maximum(code - 0.5, 0.5) / VALUE_LEVELS), np.inf)


def encode_float32(values: np.ndarray) -> bytes:
    return to_planes(values.astype(np.float32), 4)


def decode_float32(blob: bytes, count: int) -> np.ndarray:
    return from_planes(blob, 4, np.float32, count)


# Unit roundoff (half the relative spacing) of each stored hidden dtype, and
# the fp8 e4m3 subnormal half-step, in units of the per-token scale.
BF16_UNIT_ROUNDOFF = 2.0 ** -8
FP8_E4M3_UNIT_ROUNDOFF = 2.0 ** -4
FP8_E4M3_SUBNORMAL_HALF_STEP = 2.0 ** -10


def hidden_error_bound(hidden_HD: torch.Tensor, dtype: str) -> torch.Tensor:
    """Largest |decoded - x| per element for hidden states stored as `dtype`.

    bf16 rounds to nearest: |x| * 2^-8. fp8 e4m3 with scale s = amax / 448:
    |x| * 2^-4 for normal values, s * 2^-10 below the smallest normal (2^-6 s).
    Both get a float32 allowance of 1e-6 relative for the scale arithmetic.
    """
    x_HD = hidden_HD.double().abs()
    if dtype == "bf16":
        return x_HD * BF16_UNIT_ROUNDOFF * (1 + 1e-6)
    assert dtype == "fp8", dtype
    scale_H = hidden_HD.float().abs().amax(dim=-1).clamp_min(1e-12).double() / FP8_E4M3_MAX
    return torch.maximum(x_HD * FP8_E4M3_UNIT_ROUNDOFF, scale_H[:, None] * FP8_E4M3_SUBNORMAL_HALF_STEP) * (1 + 1e-6)


def encode_hidden_bf16(hidden_HD: torch.Tensor) -> np.ndarray:
    """bf16 byte planes as a flat uint8 array (see `plane_array`)."""
    bits = hidden_HD.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    return plane_array(bits, 2)


def decode_hidden_bf16(blob: bytes, rows: int, dim: int) -> torch.Tensor:
    # from_planes returns a fresh writable array: torch can take it without a copy.
    bits = from_planes(blob, 2, np.int16, rows * dim).reshape(rows, dim)
    return torch.from_numpy(bits).view(torch.bfloat16)


def quantize_fp8(hidden_HD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 e4m3 with one float32 scale per token (amax / 448), on the tensor's device.

    Backends call this on the GPU before copying to the host: it halves the
    copy and keeps the conversion off the CPU.
    """
    hidden_HD = hidden_HD.float()
    scale_H = hidden_HD.abs().amax(dim=-1).clamp_min(1e-12) / FP8_E4M3_MAX
    return (hidden_HD / scale_H[:, None]).to(torch.float8_e4m3fn), scale_H


def encode_hidden_fp8(hidden_HD: torch.Tensor, scale_H: torch.Tensor | np.ndarray | None = None,
                      ) -> tuple[np.ndarray, np.ndarray]:
    """fp8 bytes (a flat uint8 array, a view of `hidden_HD` when it is already
    quantized, contiguous and on the CPU) and per-token scales; `hidden_HD` may
    already be quantized (then pass its scales). The view spares the encode
    threads a GIL-holding copy of megabytes per row; the shard writer hands it
    to Arrow as is."""
    if hidden_HD.dtype != torch.float8_e4m3fn:
        hidden_HD, scale_H = quantize_fp8(hidden_HD)
    assert scale_H is not None, "quantized hidden states need their per-token scales"
    scale_H = scale_H.cpu().numpy() if isinstance(scale_H, torch.Tensor) else np.asarray(scale_H)
    return hidden_HD.cpu().contiguous().view(torch.uint8).reshape(-1).numpy(), scale_H.astype(np.float32)


def decode_hidden_fp8_bytes(blob, rows: int, dim: int) -> np.ndarray:
    """The stored fp8 e4m3 bytes as a uint8 [rows, dim] view of `blob` (read-only
    when the blob is), not dequantized: the trainer dequantizes on its device (a
    quarter of float32's bytes to copy, no fp8 conversion on the CPU)."""
    if len(blob) != rows * dim:
        raise ValueError(f"fp8 hidden blob holds {len(blob)} bytes, expected {rows * dim}")
    return np.frombuffer(blob, dtype=np.uint8).reshape(rows, dim)


def dequantize_fp8(bytes_HD: torch.Tensor, scale_H: torch.Tensor) -> torch.Tensor:
    """uint8-stored fp8 e4m3 values times their per-token scale, float32."""
    return bytes_HD.view(torch.float8_e4m3fn).float() * scale_H.unsqueeze(-1)


def decode_hidden_fp8(blob: bytes, scale_H: np.ndarray, rows: int, dim: int) -> torch.Tensor:
    return dequantize_fp8(torch.from_numpy(decode_hidden_fp8_bytes(blob, rows, dim).copy()),
                          torch.from_numpy(np.asarray(scale_H, dtype=np.float32)))
