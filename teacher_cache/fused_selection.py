"""One read of a chunk's logits on the GPU: the log-sum-exp at every temperature
and the max of every vocabulary block, in a single Triton kernel.

Why: at V = 201,088 the selection after the lm_head is memory-bound. Computed
apart, the log-sum-exps (max pass, then exp-sum pass) and the block maxima the
top-k starts from read the [n, V] logits three times; here each program streams
one row once, keeping a running max and rescaled exp-sums (the online softmax
update `s <- s * exp((m_old - m_new) / T) + sum(exp((x - m_new) / T))`).

Only used on CUDA with Triton present; `teacher_cache.targets` checks its first
result against the eager reference and falls back if they differ.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the eager and compiled paths in targets.py serve
    triton = None

CHUNK = 4096  # logits per loop step of a program (a multiple of the block size)


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _lse_block_max_kernel(x_ptr, row_stride, V, inv_t_ptr, lse_ptr, bmax_ptr, num_blocks,
                              NUM_T: tl.constexpr, T_PAD: tl.constexpr, BLOCK: tl.constexpr,
                              CHUNK_SIZE: tl.constexpr, NUM_CHUNKS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * row_stride
        t_offs = tl.arange(0, T_PAD)
        inv_t = tl.load(inv_t_ptr + t_offs, mask=t_offs < NUM_T, other=1.0)
        m = tl.zeros([T_PAD], tl.float32) - float("inf")  # running max, one copy per temperature
        s = tl.zeros([T_PAD], tl.float32)  # exp-sums relative to m
        BLOCKS_PER_CHUNK: tl.constexpr = CHUNK_SIZE // BLOCK
        # A compile-time trip count: Triton 3.6's interpreter cannot take range() of a runtime
        # scalar once NumPy refuses int() of a 1-element array (its scalars are such arrays); V is
        # fixed per teacher, so this compiles once.
        for c in range(NUM_CHUNKS):
            start = c * CHUNK_SIZE
            offs = start + tl.arange(0, CHUNK_SIZE)
            x = tl.load(x_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            block_max = tl.max(tl.reshape(x, [BLOCKS_PER_CHUNK, BLOCK]), axis=1)
            b_idx = start // BLOCK + tl.arange(0, BLOCKS_PER_CHUNK)
            tl.store(bmax_ptr + row * num_blocks + b_idx, block_max, mask=b_idx < num_blocks)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            e = tl.exp((x[None, :] - m_new[:, None]) * inv_t[:, None])
            s = s * tl.exp((m - m_new) * inv_t) + tl.sum(e, axis=1)
            m = m_new
        tl.store(lse_ptr + row * NUM_T + t_offs, m * inv_t + tl.log(s), mask=t_offs < NUM_T)


@functools.lru_cache(maxsize=8)
def _inv_temps_on(inv_temps: tuple[float, ...], device: torch.device) -> torch.Tensor:
    # Built once: a fresh host-to-device copy per chunk would wait for the stream to drain.
    return torch.tensor(inv_temps, dtype=torch.float32, device=device)


def lse_and_block_max(logits_nV: torch.Tensor, inv_temps: tuple[float, ...],
                      block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, T] float32 log-sum-exps of logits / T, [n, V // block] float32 maxima
    of the full blocks) from one read of the logits."""
    assert triton is not None and logits_nV.is_cuda and logits_nV.dim() == 2
    assert block > 0 and CHUNK % block == 0 and logits_nV.stride(1) == 1
    n, V = logits_nV.shape
    num_t = len(inv_temps)
    lse_nT = torch.empty((n, num_t), dtype=torch.float32, device=logits_nV.device)
    num_blocks = V // block
    bmax_nB = torch.empty((n, num_blocks), dtype=torch.float32, device=logits_nV.device)
    if n == 0:
        return lse_nT, bmax_nB
    inv_t_T = _inv_temps_on(inv_temps, logits_nV.device)
    _lse_block_max_kernel[(n,)](logits_nV, logits_nV.stride(0), V, inv_t_T, lse_nT, bmax_nB, num_blocks,
                                NUM_T=num_t, T_PAD=max(2, triton.next_power_of_2(num_t)), BLOCK=block,
                                CHUNK_SIZE=CHUNK, NUM_CHUNKS=triton.cdiv(V, CHUNK), num_warps=8)
    return lse_nT, bmax_nB
