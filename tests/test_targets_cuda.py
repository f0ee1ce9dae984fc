"""The fused one-read selection kernel (Triton, CUDA only) against a float64
reference at the teacher's real vocabulary size. Skipped without a GPU; run on
one with `python -m pytest tests/test_targets_cuda.py`."""

from __future__ import annotations

import pytest
import torch

from common.spec import TargetSpec
from teacher_cache import fused_selection, targets

pytestmark = pytest.mark.skipif(not fused_selection.available(), reason="needs CUDA and Triton")


def peaked_bf16_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(rows, vocab, device="cuda", generator=gen) * 3.0
    logits[:, ::977] += 12.0  # a few clear favourites per row, spread over many blocks
    return logits.to(torch.bfloat16)


@pytest.mark.parametrize("vocab,block", [(201_088, 128), (50_000, 64), (4_100, 128)])
def test_lse_and_block_max_equal_float64_reference(vocab, block):
    logits_NV = peaked_bf16_logits(37, vocab, seed=vocab)
    inv_temps = (1.0, 0.5, 2.0)
    lse_NT, bmax_NB = fused_selection.lse_and_block_max(logits_NV, inv_temps, block)
    ref = logits_NV.double()
    ref_lse = torch.stack([torch.logsumexp(ref * s, dim=-1) for s in inv_temps], dim=-1)
    torch.testing.assert_close(lse_NT.double(), ref_lse, rtol=2e-6, atol=2e-6)
    full = vocab // block
    assert torch.equal(bmax_NB, ref[:, :full * block].reshape(37, full, block).amax(dim=-1).float())


def test_compute_targets_uses_the_fused_kernel_and_keeps_exact_values(monkeypatch):
    monkeypatch.setattr(targets, "_fused_state", None)
    spec = TargetSpec(k=64, temperatures=(1.0, 2.0))
    logits_NV = peaked_bf16_logits(300, 201_088, seed=1)
    got = targets.compute_targets(logits_NV, lambda x: x, spec, chunk_size=128)
    assert targets._fused_state is True
    ref_vals = logits_NV.double().topk(64, dim=-1).values
    assert torch.equal(got.topk_logits_NK.double().sort(dim=-1, descending=True).values, ref_vals)
    assert torch.equal(logits_NV.gather(1, got.topk_ids_NK).double(), got.topk_logits_NK.double())
    ref_lse = torch.stack([torch.logsumexp(logits_NV.double() / t, dim=-1) for t in spec.temperatures], dim=-1)
    torch.testing.assert_close(got.lse_NT.double(), ref_lse, rtol=2e-6, atol=2e-6)
