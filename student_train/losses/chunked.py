"""The chunked lm_head + CE + KL: the driver every divergence runs in.

Valid rows are selected once; the lm_head runs one chunk of positions at a time, and each chunk's
CE, KL (the divergence named by kl_mode, student_train/losses/divergences.py) and the gradient of
their weighted sum with respect to the logits are turned at once into gradient rows of the hidden
states and a summed gradient of the lm_head weight. Logits never exist for more than one chunk.
Shape suffixes as in student_train/losses/__init__.py; R is the valid (unmasked) positions.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from common.causal_lm import IGNORE_INDEX
from student_train.losses.config import objective_weights
from student_train.losses.divergences import get_divergence
from student_train.losses.targets import Targets


def distill_loss(
    hidden_ND: Tensor,
    weight_VD: Tensor,
    labels_N: Tensor,
    targets: Targets | None,
    num_valid_tokens_global: float,
    *,
    ce_weight: float = 1.0,
    kl_weight: float = 1.0,
    kl_mode: str = "tail",
    kl_temperature: float = 1.0,
    scale_by_t2: bool = True,
    chunk_size: int = 1024,
    compile_chunks: bool = False,
    weights_N: Tensor | None = None,
    groups_N: Tensor | None = None,
    num_groups: int = 0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """sum over positions with labels_N != -100 of (ce_weight*CE + kl_weight*s*KL_T), divided by
    num_valid_tokens_global; s = T**2 when scale_by_t2, else 1 (config.objective_weights). KL_T is the
    divergence named kl_mode (divergences.DIVERGENCES) between the teacher and the student at temperature T.

    Logits exist one chunk of chunk_size positions at a time, in forward and backward: the
    gradients are computed in forward and only [N, D] and [V, D] tensors are kept for backward.
    The metrics are detached sums over this call's valid positions: ce_sum, kl_sum (plain KL at
    temperature T, without the T**2 factor), valid_tokens, top1_agree_sum (student argmax ==
    teacher argmax). With targets None only CE is computed and kl_weight must be 0.

    Peak extra memory is about three [chunk_size, V] float32 buffers, plus a float32 [V, D]
    accumulator (and one [V, D] product in the weight's dtype) when the weight is trained. On an
    H100 with V=201,088, D=2880, 4096 bf16 positions, chunk 1024: 2.4 GiB frozen, 5.6 GiB trained.

    weights_N (optional, >= 0): each position's weight in the loss (loss.channel_weights); the loss
    is then the weighted sum over num_valid_tokens_global, which must be the weighted count. The
    metric sums stay unweighted.

    groups_N (optional, int64 in [0, num_groups) at valid positions): the metric sums are also
    returned per group, as group_sums_G4 (columns ce, kl, top1 agreement, valid positions), from
    the same per-position values: eval's breakdown by source and channel.
    """
    if hidden_ND.dim() != 2 or weight_VD.dim() != 2 or weight_VD.shape[1] != hidden_ND.shape[1]:
        raise ValueError(f"need hidden [N, D] and weight [V, D], got {tuple(hidden_ND.shape)} "
                         f"and {tuple(weight_VD.shape)}")
    n = hidden_ND.shape[0]
    if labels_N.shape != (n,) or labels_N.dtype != torch.int64:
        raise ValueError(f"labels must be int64 [{n}], got {labels_N.dtype} {tuple(labels_N.shape)}")
    num_valid_tokens_global = float(num_valid_tokens_global)
    if not num_valid_tokens_global > 0:
        raise ValueError(f"num_valid_tokens_global must be > 0, got {num_valid_tokens_global}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if weights_N is not None and weights_N.shape != (n,):
        raise ValueError(f"weights must be [{n}], got {tuple(weights_N.shape)}")
    if groups_N is not None and (groups_N.shape != (n,) or num_groups < 1):
        raise ValueError(f"groups must be [{n}] with num_groups >= 1, got {tuple(groups_N.shape)}, {num_groups}")
    if not kl_temperature > 0:
        raise ValueError(f"kl_temperature must be > 0, got {kl_temperature}")
    vocab = weight_VD.shape[0]
    valid_N = labels_N != IGNORE_INDEX
    if bool(((labels_N < 0) & valid_N).any() | (labels_N >= vocab).any()):
        raise ValueError(f"labels must be -100 or in [0, {vocab})")
    divergence = None
    if targets is None:
        if kl_weight != 0:
            raise ValueError("kl_weight > 0 needs teacher targets")
    else:
        divergence = get_divergence(kl_mode)
        divergence.check_targets(targets, n, vocab)

    ce_coef, kl_coef = objective_weights(ce_weight, kl_weight, kl_temperature, scale_by_t2)
    loss, ce_sum, kl_sum, agree_sum, valid, group_sums_G4 = _FusedLinearDistill.apply(
        hidden_ND, weight_VD, labels_N, targets, divergence, float(kl_temperature),
        ce_coef / num_valid_tokens_global, kl_coef / num_valid_tokens_global, chunk_size,
        torch.is_grad_enabled() and (hidden_ND.requires_grad or weight_VD.requires_grad), compile_chunks, weights_N,
        groups_N, num_groups)
    metrics = dict(ce_sum=ce_sum, kl_sum=kl_sum, valid_tokens=valid, top1_agree_sum=agree_sum)
    if groups_N is not None:
        metrics["group_sums_G4"] = group_sums_G4
    return loss, metrics


class _FusedLinearDistill(torch.autograd.Function):
    """Forward computes the loss and its gradients chunk by chunk; backward only rescales them."""

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, labels_N, targets, divergence, temperature, ce_coef, kl_coef,
                chunk_size, need_grads=True, compile_chunks=False, weights_N=None, groups_N=None, num_groups=0):
        # float64 inputs get a float64 loss (tests); everything else computes in float32.
        compute_dtype = torch.float64 if torch.float64 in (hidden_ND.dtype, weight_VD.dtype) else torch.float32
        # The weight is the big operand: never copy it, bring the hidden rows to its dtype instead.
        mm_dtype = weight_VD.dtype
        # Under no_grad (eval) nothing will call backward: skip both gradient matmuls.
        want_weight_grad = ctx.needs_input_grad[1] and need_grads

        # Masked positions skip the lm_head entirely; their gradient rows stay exactly zero.
        rows_R = (labels_N != IGNORE_INDEX).nonzero().squeeze(1)
        hidden_RD = hidden_ND[rows_R].to(mm_dtype)
        labels_R = labels_N[rows_R]
        targets_R = targets.rows(rows_R) if targets is not None else None
        weights_R = weights_N[rows_R].to(compute_dtype) if weights_N is not None else None

        grad_hidden_ND = torch.zeros_like(hidden_ND) if need_grads else None
        # Summed over chunks in compute precision, stored in the weight's dtype below.
        grad_weight_VD = (torch.zeros(weight_VD.shape, dtype=compute_dtype, device=weight_VD.device)
                          if want_weight_grad else None)
        zero = hidden_ND.new_zeros((), dtype=compute_dtype)
        ce_sum, kl_sum, agree_sum = zero.clone(), zero.clone(), zero.clone()
        ce_wsum, kl_wsum = zero.clone(), zero.clone()  # weighted: what the loss is made of
        groups_R = groups_N[rows_R] if groups_N is not None else None
        group_sums_G4 = hidden_ND.new_zeros((num_groups if groups_R is not None else 0, 4), dtype=compute_dtype)

        chunk_fn = _compiled_chunk_loss_and_grad() if compile_chunks else _chunk_loss_and_grad
        # Tensors, not floats: the coefficients change every step (they hold the global token count),
        # which would otherwise recompile a compiled chunk function each time.
        ce_coef_t, kl_coef_t = (torch.tensor(c, dtype=compute_dtype, device=hidden_ND.device)
                                for c in (ce_coef, kl_coef))
        for start in range(0, rows_R.numel(), chunk_size):
            chunk = slice(start, start + chunk_size)
            hidden_CD = hidden_RD[chunk]
            # Weighted: each position's coefficients carry its weight ([C, 1], broadcast over V).
            ce_coef_c, kl_coef_c = ((ce_coef_t, kl_coef_t) if weights_R is None else
                                    (ce_coef_t * weights_R[chunk, None], kl_coef_t * weights_R[chunk, None]))
            ce_C, kl_C, agree_C, grad_logits_CV = chunk_fn(
                hidden_CD @ weight_VD.T, labels_R[chunk], targets_R.rows(chunk) if targets_R is not None else None,
                divergence, temperature, ce_coef_c, kl_coef_c, compute_dtype)
            ce_sum += ce_C.sum()
            kl_sum += kl_C.sum()
            agree_sum += agree_C.sum()
            if weights_R is not None:
                ce_wsum += (weights_R[chunk] * ce_C).sum()
                kl_wsum += (weights_R[chunk] * kl_C).sum()
            if groups_R is not None:
                group_sums_G4.index_add_(0, groups_R[chunk], torch.stack([ce_C, kl_C, agree_C,
                                                                          torch.ones_like(ce_C)], 1))

            if not need_grads:
                del grad_logits_CV
                continue
            grad_logits_CV = grad_logits_CV.to(mm_dtype)
            grad_hidden_ND.index_copy_(0, rows_R[chunk], (grad_logits_CV @ weight_VD).to(hidden_ND.dtype))
            if want_weight_grad:
                if mm_dtype == compute_dtype:
                    grad_weight_VD.addmm_(grad_logits_CV.T, hidden_CD)
                else:  # low-precision product, full-precision sum over chunks
                    grad_weight_VD += grad_logits_CV.T @ hidden_CD
            del grad_logits_CV

        if want_weight_grad:
            grad_weight_VD = grad_weight_VD.to(weight_VD.dtype)
        ctx.save_for_backward(grad_hidden_ND, grad_weight_VD)
        loss = ce_coef * ce_sum + kl_coef * kl_sum if weights_R is None else ce_coef * ce_wsum + kl_coef * kl_wsum
        valid = zero + rows_R.numel()
        ctx.mark_non_differentiable(ce_sum, kl_sum, agree_sum, valid, group_sums_G4)
        return loss, ce_sum, kl_sum, agree_sum, valid, group_sums_G4

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_unused_metric_grads):
        grad_hidden_ND, grad_weight_VD = ctx.saved_tensors
        grad_hidden_ND = grad_hidden_ND * grad_loss.to(grad_hidden_ND.dtype)
        if grad_weight_VD is not None:
            grad_weight_VD = grad_weight_VD * grad_loss.to(grad_weight_VD.dtype)
        return (grad_hidden_ND, grad_weight_VD) + (None,) * 12


def _chunk_loss_and_grad(logits_mm_CV, labels_C, targets, divergence, temperature, ce_coef, kl_coef,
                         compute_dtype):
    """Per-position CE and KL, top-1 agreement, and d(loss)/d(logits), from the lm_head's output in its
    own dtype; ce_coef and kl_coef are 0-dim tensors, or [C, 1] (each position's own, when weighted)."""
    logits_CV = logits_mm_CV.to(compute_dtype)
    lse_C = torch.logsumexp(logits_CV, -1)  # shared by CE and, at T=1, the KL
    ce_C = lse_C - logits_CV.gather(1, labels_C[:, None]).squeeze(1)

    kl_C = torch.zeros_like(lse_C)
    agree_C = torch.zeros_like(lse_C)
    dense_CV = sparse_ids_CK = sparse_grad_CK = None
    if targets is not None:
        kl_C, dense_CV, sparse_ids_CK, sparse_grad_CK = divergence.value_and_grad(logits_CV, lse_C, targets,
                                                                                 temperature)
        agree_C = (logits_CV.argmax(-1) == targets.teacher_top1_N()).to(lse_C.dtype)

    # d/dlogits = ce_coef * (softmax - onehot) + kl_coef / T * dKL/d(logits / T)
    grad_CV = logits_CV.sub_(lse_C[:, None]).exp_().mul_(ce_coef)
    grad_CV.scatter_add_(1, labels_C[:, None], (-ce_coef).reshape(-1, 1).expand(labels_C.numel(), 1).to(grad_CV.dtype))
    if dense_CV is not None:
        grad_CV.add_(dense_CV.mul_(kl_coef / temperature))
    if sparse_ids_CK is not None:
        grad_CV.scatter_add_(1, sparse_ids_CK, sparse_grad_CK.mul_(kl_coef / temperature))
    return ce_C, kl_C, agree_C, grad_CV


@functools.cache
def _compiled_chunk_loss_and_grad():
    """_chunk_loss_and_grad under torch.compile, built once per process: the dozen passes over a
    [chunk, V] float32 buffer become a few fused kernels. Chunk lengths vary (the last chunk of a
    micro batch), so the chunk dimension is dynamic."""
    return torch.compile(_chunk_loss_and_grad, dynamic=True)
