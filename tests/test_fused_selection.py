"""The fused one-read selection kernel (Triton) against a float64 reference.

On a GPU: at the teacher's real vocabulary size, and inside compute_targets.
Without one, where Triton is installed: the same kernel in Triton's CPU
interpreter (a subprocess, since the interpreter is chosen at import). Both are
skipped on a plain CPU install; run them with `python -m pytest
tests/test_fused_selection.py` on a GPU machine."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from common.spec import TargetSpec
from teacher_cache import fused_selection, targets

needs_gpu = pytest.mark.skipif(not fused_selection.available(), reason="needs CUDA and Triton")
ROOT = Path(__file__).resolve().parents[1]

INTERPRETED = textwrap.dedent("""
    import torch, triton
    from teacher_cache import fused_selection as fs
    torch.manual_seed(0)
    for n, V, block, temps in [(5, 20000, 128, (1.0, 0.5)), (3, 9000, 64, (1.0,)), (4, 4100, 128, (1.0, 0.5, 2.0))]:
        x = (torch.randn(n, V) * 3).to(torch.bfloat16)
        x[:, ::977] += 12.0
        lse, blocks = torch.empty(n, len(temps)), V // block
        bmax = torch.empty(n, blocks)
        fs._lse_block_max_kernel[(n,)](x, x.stride(0), V, torch.tensor(temps), lse, bmax, blocks, NUM_T=len(temps),
                                       T_PAD=max(2, triton.next_power_of_2(len(temps))), BLOCK=block,
                                       CHUNK_SIZE=fs.CHUNK, NUM_CHUNKS=triton.cdiv(V, fs.CHUNK))
        ref = torch.stack([torch.logsumexp(x.double() * s, -1) for s in temps], -1)
        torch.testing.assert_close(lse.double(), ref, rtol=2e-6, atol=2e-6)
        assert torch.equal(bmax, x.double()[:, :blocks * block].reshape(n, blocks, block).amax(-1).float())
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_kernel_in_the_triton_interpreter_equals_float64_reference():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def peaked_bf16_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(rows, vocab, device="cuda", generator=gen) * 3.0
    logits[:, ::977] += 12.0  # a few clear favourites per row, spread over many blocks
    return logits.to(torch.bfloat16)


@needs_gpu
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


@needs_gpu
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


def reference_kernel(logits_nV, inv_temps, block):
    full = logits_nV.shape[1] // block
    return (targets._lse_eager(logits_nV, inv_temps),
            logits_nV[:, :full * block].reshape(len(logits_nV), full, block).amax(dim=-1).float())


@pytest.mark.parametrize("kernel,expect_used,warning", [
    (reference_kernel, True, None),
    (lambda x, t, b: (reference_kernel(x, t, b)[0] + 1e-3, reference_kernel(x, t, b)[1]), False, "disagrees"),
    (lambda x, t, b: (reference_kernel(x, t, b)[0], reference_kernel(x, t, b)[1] - 1.0), False, "disagrees"),
    (lambda x, t, b: 1 / 0, False, "unavailable"),
])
def test_the_first_fused_result_is_checked_and_a_bad_kernel_is_turned_off(monkeypatch, kernel, expect_used, warning):
    # The guard around the kernel, on CPU: a stand-in kernel that is right, wrong, or fails to build.
    monkeypatch.setattr(targets, "_fused_state", None)
    monkeypatch.setattr(fused_selection, "available", lambda: True)
    monkeypatch.setattr(fused_selection, "lse_and_block_max", kernel)
    logits_NV = (torch.randn(40, 1000, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = targets._fused_lse_block_max(logits_NV, (1.0, 0.5), 64)
    assert (got is not None) == expect_used
    assert targets._fused_state is expect_used
    messages = [str(w.message) for w in caught]
    if warning is None:
        assert not any("fused" in m for m in messages), messages
    else:
        assert any(warning in m for m in messages), messages
    if not expect_used:  # turned off for the rest of the process, without another try
        monkeypatch.setattr(fused_selection, "lse_and_block_max", reference_kernel)
        assert targets._fused_lse_block_max(logits_NV, (1.0, 0.5), 64) is None
