"""Sequence packing: several cache rows back to back in one batch row of `seq_len` tokens.

A chat mix's rows are mostly far shorter than 4,096 tokens; padded one per batch row,
a micro batch carries a fraction of the tokens its fixed costs (the step's host gaps,
the optimizer, the reductions) are paid for. Packed, every micro batch is exactly
[micro_batch, seq_len]: one shape for the compiled blocks, and nearly no padding.

Exactness. Each packed row restarts its `position_ids` at 0, and transformers' mask
builders, given those positions and no 2-D mask, read the restarts as document
boundaries (`masking_utils.find_packed_sequence_indices`) and let no token attend
across them, for full and sliding-window layers and every attention implementation.
Not every model hands its positions to the mask builders (GPT-OSS does not), so the
masks are built here, one per layer type, and given to the model ready-made. A row's
first token is never a target (no position of its own row predicts it), and in a
packed row it must not become one for the previous row's last position: the loader
writes IGNORE_INDEX there. `check_packed_attention` proves, once per run, that the
student really keeps packed rows apart (a custom attention that ignores position
restarts would silently mix them).

Bins are made once per loader, from the rows' lengths and the seed: rows in a seeded
order, in windows of `PACK_WINDOW` rows, longest first, each into the fullest bin it
fits (best fit). Epochs then shuffle whole bins, so a step's rows still come from
all over the cache. Shape suffixes: N rows, G bins, R rows per bin (padded with
EMPTY), L tokens.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

EMPTY = np.iinfo(np.int64).min  # no row in this slot of a bin
PACK_WINDOW = 4096  # rows packed together; bigger fills bins better, smaller keeps the order more local
_PACK_TAG = 0x5041434B  # keeps packing's random stream apart from the epoch order's


def pack_rows(lengths_N: np.ndarray, seq_len: int, seed: int, shuffle: bool) -> np.ndarray:
    """Bins [G, R] of row numbers (EMPTY-padded) holding every row once; each bin's rows
    sum to at most seq_len tokens. Without shuffle rows keep cache order across windows."""
    lengths_N = np.asarray(lengths_N, dtype=np.int64)
    assert lengths_N.ndim == 1 and (lengths_N <= seq_len).all() and (lengths_N >= 1).all()
    if shuffle:
        order_N = np.random.Generator(np.random.PCG64([seed, _PACK_TAG])).permutation(len(lengths_N))
    else:
        order_N = np.arange(len(lengths_N))
    bins: list[list[int]] = []
    for start in range(0, len(order_N), PACK_WINDOW):
        bins.extend(_best_fit(order_N[start:start + PACK_WINDOW], lengths_N, seq_len))
    width = max((len(b) for b in bins), default=1)
    bins_GR = np.full((len(bins), width), EMPTY, dtype=np.int64)
    for g, rows in enumerate(bins):
        bins_GR[g, :len(rows)] = rows
    return bins_GR


def _best_fit(rows: np.ndarray, lengths_N: np.ndarray, seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: each row, longest first, into the open bin with the least room
    that still fits it. Open bins are kept by their free tokens."""
    rows = rows[np.argsort(-lengths_N[rows], kind="stable")]
    by_free: list[list[int]] = [[] for _ in range(seq_len + 1)]  # free tokens -> open bins
    free_count = np.zeros(seq_len + 1, dtype=np.int64)
    bins: list[list[int]] = []
    for n in rows:
        length = int(lengths_N[n])
        fits_F = free_count[length:] > 0
        if fits_F.any():
            free = length + int(fits_F.argmax())  # the least room that still fits
            g = by_free[free].pop()
            free_count[free] -= 1
        else:
            g, free = len(bins), seq_len
            bins.append([])
        bins[g].append(int(n))
        free -= length
        by_free[free].append(g)
        free_count[free] += 1
    return bins


def plan_packed_epoch(bins_GR: np.ndarray, epoch: int, *, micro_batch: int, world_size: int, seed: int,
                      shuffle: bool) -> np.ndarray:
    """Bin rows [steps, world_size, micro_batch, R] for one epoch. Shuffled: a seeded
    permutation of the bins, the leftover bins of the last step skipped this epoch. In
    order (eval): every bin once, the last step completed with empty bins."""
    num_bins = len(bins_GR)
    bins_per_step = world_size * micro_batch
    if shuffle:
        rng = np.random.Generator(np.random.PCG64([seed, epoch, _PACK_TAG]))
        order = rng.permutation(num_bins)[: num_bins - num_bins % bins_per_step]
        plan = bins_GR[order]
    else:
        empty = np.full((-num_bins % bins_per_step, bins_GR.shape[1]), EMPTY, dtype=np.int64)
        plan = np.concatenate([bins_GR, empty])
    return plan.reshape(-1, world_size, micro_batch, bins_GR.shape[1])


def packed_position_ids(lengths: list[int], seq_len: int) -> np.ndarray:
    """Positions of one packed batch row: 0..n-1 for each row in turn, then 0.. for the pad
    tail, which so forms its own document and attends to no real token."""
    pieces = [np.arange(n) for n in lengths]
    if sum(lengths) < seq_len:
        pieces.append(np.arange(seq_len - sum(lengths)))
    return np.concatenate(pieces) if pieces else np.arange(seq_len)


_MASK_BUILDERS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


def packed_attention_masks(config, position_ids_BL: torch.Tensor, dtype: torch.dtype):
    """The attention masks of a packed batch, as the model's own forward would build them had it
    passed its positions on: one mask, or {layer type: mask} for models with `layer_types`."""
    batch, length = position_ids_BL.shape
    shape_only_BL0 = torch.empty(batch, length, 0, dtype=dtype, device=position_ids_BL.device)
    kwargs = dict(config=config, inputs_embeds=shape_only_BL0, attention_mask=None, past_key_values=None,
                  position_ids=position_ids_BL)
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return create_causal_mask(**kwargs)
    unknown = sorted(set(layer_types) - _MASK_BUILDERS.keys())
    if unknown:
        raise ValueError(f"data.pack: the student has layer types {unknown}; packing knows "
                         f"{sorted(_MASK_BUILDERS)}")
    return {kind: _MASK_BUILDERS[kind](**kwargs) for kind in sorted(set(layer_types))}


def packed_inputs(student: torch.nn.Module, position_ids_BL: torch.Tensor) -> dict:
    """Keyword arguments for the student's decoder on a packed batch."""
    dtype = student.get_input_embeddings().weight.dtype
    return dict(position_ids=position_ids_BL,
                attention_mask=packed_attention_masks(student.config, position_ids_BL, dtype))


@torch.no_grad()
def check_packed_attention(student: torch.nn.Module, device: torch.device, tokens_per_row: int = 160) -> None:
    """Raises ValueError unless the student keeps packed rows apart: the second of two packed
    rows must come out the same whatever the first row holds, as it does not when the two
    are joined with no boundary. Same shapes both times, so bf16 rounding cannot pass for
    leakage. Runs eagerly, before compile and FSDP."""
    decoder = student.get_decoder()
    vocab = student.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    n = tokens_per_row
    first_a, first_b, second = (torch.randint(1, vocab, (1, n), generator=generator).to(device) for _ in range(3))
    restart_1L = torch.cat([torch.arange(n), torch.arange(n)]).unsqueeze(0).to(device)

    def second_row(first, packed: bool):
        ids_1L = torch.cat([first, second], dim=1)
        inputs = packed_inputs(student, restart_1L) if packed else {}
        return decoder(input_ids=ids_1L, use_cache=False, **inputs).last_hidden_state[0, n:].float()

    was_training = student.training
    student.eval()
    try:
        joined_gap = (second_row(first_a, False) - second_row(first_b, False)).abs().mean().item()
        try:
            packed_gap = (second_row(first_a, True) - second_row(first_b, True)).abs().mean().item()
        except (TypeError, KeyError, AttributeError, RuntimeError) as exc:
            raise ValueError(f"data.pack: the student ({type(student).__name__}) does not take packed rows' "
                             f"position ids and attention masks: {type(exc).__name__}: {exc}") from exc
    finally:
        student.train(was_training)
    if not packed_gap <= 0.05 * joined_gap:
        raise ValueError(
            f"data.pack: the student ({type(student).__name__}, attn_implementation "
            f"{getattr(student.config, '_attn_implementation', '?')}) lets packed rows attend to each other "
            f"(a packed row moves by {packed_gap:.3g} on average when the row before it changes, {joined_gap:.3g} "
            f"with no boundary): its attention does not take the packed masks; set data.pack: false")
