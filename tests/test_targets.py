"""Target selection on bf16 logits (what a bf16 teacher's lm_head returns)
against a float64 reference, eager and compiled."""

from __future__ import annotations

import torch

from common.spec import TargetSpec
from teacher_cache.targets import _lse_eager, block_max_topk, compiled_lse, compute_targets


def distinct_bf16_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Logits whose values are exact in bf16 and distinct within a row (no ties
    for top-k), spread like a peaked distribution."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.arange(vocab, dtype=torch.float64) / 16.0 - 12.0  # multiples of 1/16: exact in bf16 below 16
    rows_RV = torch.stack([grid[torch.randperm(vocab, generator=gen)] for _ in range(rows)])
    return rows_RV.to(torch.bfloat16)


def test_topk_and_lse_of_bf16_logits_equal_float64_reference():
    spec = TargetSpec(k=8, temperatures=(1.0, 2.0, 0.5))
    logits_NV = distinct_bf16_logits(37, 300, seed=1)
    got = compute_targets(logits_NV, lambda x: x, spec, chunk_size=16)  # 3 chunks, the last one short
    ref_NV = logits_NV.double()
    ref_vals, ref_ids = ref_NV.topk(spec.k, dim=-1)
    assert got.topk_logits_NK.dtype == torch.float32
    assert torch.equal(got.topk_ids_NK, ref_ids)
    assert torch.equal(got.topk_logits_NK.double(), ref_vals)
    ref_lse = torch.stack([torch.logsumexp(ref_NV / t, dim=-1) for t in spec.temperatures], dim=-1)
    assert got.lse_NT.shape == (37, 3)
    torch.testing.assert_close(got.lse_NT.double(), ref_lse, rtol=2e-6, atol=2e-6)


def test_compiled_lse_matches_eager_and_float64_for_any_row_count():
    inv_temps = (1.0, 0.5)
    compiled = compiled_lse()
    for rows in (5, 19):  # one compiled graph with a dynamic row count
        logits_NV = distinct_bf16_logits(rows, 513, seed=rows)
        ref = torch.stack([torch.logsumexp(logits_NV.double() * s, dim=-1) for s in inv_temps], dim=-1)
        eager = _lse_eager(logits_NV, inv_temps)
        got = compiled(logits_NV, inv_temps)
        assert got.dtype == torch.float32 and got.shape == (rows, 2)
        torch.testing.assert_close(got.double(), ref, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)


def test_block_max_topk_equals_one_pass_topk():
    # Blocks that divide the vocabulary, a short last block, too few blocks
    # (falls back to one plain top-k), and no blocks.
    # (distinct_bf16_logits has no ties up to 448 entries; float32 beyond.)
    for vocab, block in ((320, 8), (403, 8), (300, 64), (97, 0), (5003, 16)):
        logits_NV = (distinct_bf16_logits(11, vocab, seed=vocab) if vocab <= 448
                     else torch.randn(11, vocab, generator=torch.Generator().manual_seed(vocab)))
        vals_NK, ids_NK = block_max_topk(logits_NV, 8, block)
        ref_vals, ref_ids = logits_NV.double().topk(8, dim=-1)
        order = ids_NK.argsort(dim=-1)
        assert torch.equal(ids_NK.gather(1, order), ref_ids.sort(dim=-1).values), (vocab, block)
        assert torch.equal(vals_NK.gather(1, order).double(), ref_vals.gather(1, ref_ids.argsort(dim=-1)))


def test_block_max_topk_keeps_the_kth_value_under_ties():
    # bf16 logits on a coarse grid: many ties, some across the k-th place.
    gen = torch.Generator().manual_seed(3)
    logits_NV = (torch.randint(0, 40, (9, 777), generator=gen).float() / 4).to(torch.bfloat16)
    vals_NK, ids_NK = block_max_topk(logits_NV, 16, 12)
    ref_vals = logits_NV.topk(16, dim=-1).values
    assert torch.equal(vals_NK.sort(dim=-1, descending=True).values, ref_vals)
    assert torch.equal(logits_NV.gather(1, ids_NK), vals_NK)  # each value sits at its id
    assert all(len(set(r.tolist())) == 16 for r in ids_NK)  # no id twice


def test_block_max_topk_when_the_top_entries_share_blocks():
    # The largest entries sit in one block and in the short last block
    # (603 = 75 * 8 + 3): most of the k chosen blocks hold none of the top-k.
    logits_V = torch.linspace(-5.0, 0.0, 603, dtype=torch.float64)
    logits_V[40:48] = torch.arange(8, dtype=torch.float64) + 10.0
    logits_V[600:603] = torch.arange(3, dtype=torch.float64) + 20.0
    logits_NV = torch.stack([logits_V, logits_V.flip(0)])
    vals_NK, ids_NK = block_max_topk(logits_NV, 8, 8)
    ref_vals, ref_ids = logits_NV.topk(8, dim=-1)
    assert torch.equal(ids_NK.sort(dim=-1).values, ref_ids.sort(dim=-1).values)
    assert torch.equal(vals_NK.sort(dim=-1).values, ref_vals.sort(dim=-1).values)
    vals_NK, ids_NK = block_max_topk(logits_NV, 12, 9)  # 67 blocks, no tail
    ref_vals, ref_ids = logits_NV.topk(12, dim=-1)
    assert torch.equal(ids_NK.sort(dim=-1).values, ref_ids.sort(dim=-1).values)
