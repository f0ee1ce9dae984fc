"""Chunked fused lm_head + CE + KL vs a naive full-logits loss.

Measures peak GPU memory and forward+backward time at the production shape
(V = 201,088, D = 2880, 4096 tokens, top-64 targets with a tail bucket, T=2),
and checks the two agree. Run on a GPU:

    python bench/loss_bench.py [--tokens 4096] [--vocab 201088] [--dim 2880]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from common.causal_lm import IGNORE_INDEX
from student_train.losses import TopkTargets, distill_loss


def naive_loss(hidden_ND, weight_VD, labels_N, targets: TopkTargets, temperature, num_valid):
    """What a straightforward trainer does: full [N, V] logits, CE + top-k tail KL."""
    logits_NV = (hidden_ND @ weight_VD.T).float()
    ce = F.cross_entropy(logits_NV, labels_N, ignore_index=IGNORE_INDEX, reduction="sum")
    logq_NV = torch.log_softmax(logits_NV / temperature, dim=-1)
    logq_NK = logq_NV.gather(1, targets.ids_NK)
    logp_NK = targets.logits_NK / temperature - targets.lse_NT[:, targets.lse_index:targets.lse_index + 1]
    p_NK = logp_NK.exp()
    p_tail = (1 - p_NK.sum(-1)).clamp_min(1e-12)
    q_tail = (1 - logq_NK.exp().sum(-1)).clamp_min(1e-12)
    kl_N = (p_NK * (logp_NK - logq_NK)).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    valid = labels_N != IGNORE_INDEX
    kl = (kl_N * valid).sum() * temperature**2
    return (ce + kl) / num_valid


def make_inputs(tokens, vocab, dim, k, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=g).to(device, torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(vocab, dim, generator=g) * dim**-0.5 * 4).to(device, torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    labels[: tokens // 4] = IGNORE_INDEX
    teacher_logits = torch.randn(tokens, vocab, generator=g) * 3
    top_logits, top_ids = teacher_logits.topk(k, dim=-1)
    lse = torch.stack([torch.logsumexp(teacher_logits / t, -1) for t in (1.0, 2.0)], -1)
    targets = TopkTargets(ids_NK=top_ids.to(device), logits_NK=top_logits.to(device), lse_NT=lse.to(device), lse_index=1)
    return hidden, weight, labels, targets


def measure(fn, hidden, weight, repeats=5):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = None
    for _ in range(2):
        hidden.grad = weight.grad = None
        loss = fn()
        loss.backward()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        hidden.grad = weight.grad = None
        loss = fn()
        loss.backward()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    peak = torch.cuda.max_memory_allocated() - base
    return loss.item(), hidden.grad.float().clone(), seconds, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=201088)
    ap.add_argument("--dim", type=int, default=2880)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=1024)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark measures GPU memory"
    hidden, weight, labels, targets = make_inputs(args.tokens, args.vocab, args.dim, args.k, "cuda")
    num_valid = int((labels != IGNORE_INDEX).sum())
    chunked = lambda: distill_loss(hidden, weight, labels, targets, num_valid, ce_weight=1.0, kl_weight=1.0,
                                   kl_mode="tail", kl_temperature=2.0, chunk_size=args.chunk)[0]
    naive = lambda: naive_loss(hidden, weight, labels, targets, 2.0, num_valid)
    rows = {}
    for name, fn in (("chunked", chunked), ("naive", naive)):
        try:
            rows[name] = measure(fn, hidden, weight)
        except torch.OutOfMemoryError:
            rows[name] = None
        torch.cuda.empty_cache()
    print(f"| loss ({args.tokens} tokens, V={args.vocab}, D={args.dim}, top-{args.k}, T=2) | fwd+bwd ms | peak extra GiB |")
    print("|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {'OOM' if r is None else f'{r[2] * 1e3:.1f}'} | {'-' if r is None else f'{r[3] / 2**30:.2f}'} |")
    result = {name: None if r is None else {"loss": r[0], "ms": r[2] * 1e3, "peak_gib": r[3] / 2**30}
              for name, r in rows.items()}
    if rows.get("chunked") and rows.get("naive"):
        grad_err = (rows["chunked"][1] - rows["naive"][1]).abs().max().item()
        scale = rows["naive"][1].abs().max().item()
        result["loss_abs_diff"] = abs(rows["chunked"][0] - rows["naive"][0])
        result["grad_rel_err"] = grad_err / scale
        print(f"agreement: |loss diff| {result['loss_abs_diff']:.2e}, max grad err / max grad {result['grad_rel_err']:.2e}")
        print(f"memory ratio naive/chunked {rows['naive'][3] / rows['chunked'][3]:.1f}x, "
              f"time ratio chunked/naive {rows['chunked'][2] / rows['naive'][2]:.2f}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "loss_bench.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
