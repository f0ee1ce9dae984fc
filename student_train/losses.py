"""Student-side distillation losses: fused lm_head + CE + KL in token chunks,
and a cosine loss between student and teacher hidden states.

Shape suffixes: N positions (batch x sequence, flattened; the caller has already
shifted, so row n of every input describes the token that follows position n),
D student width, E teacher width, V vocabulary, K kept top-k ids, M distinct
sampled ids (padded), T cached temperatures, C positions in one chunk.

Every loss returns sum / num_valid_global, where the count spans all ranks and
accumulation steps (torchtitan style), so chunks, microbatches and ranks add up.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from common.causal_lm import IGNORE_INDEX

KL_MODES = ("tail", "renorm", "sampled")


@dataclass(frozen=True)
class LossConfig:
    ce_weight: float = 1.0
    kl_weight: float = 1.0
    hidden_cosine_weight: float = 0.0
    kl_temperature: float = 1.0
    kl_mode: str = "tail"
    scale_by_t2: bool = True  # Hinton: keeps the KL gradient's size independent of T
    chunk_size: int = 1024
    compile_chunks: bool = False  # torch.compile the per-chunk loss and gradient (one fused pass on GPUs)
    # (student_layer, teacher_layer), both 1-based: the stream leaving that decoder layer
    layer_pairs: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        for key in ("ce_weight", "kl_weight", "hidden_cosine_weight"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
        if self.ce_weight == 0 and self.kl_weight == 0 and self.hidden_cosine_weight == 0:
            raise ValueError("ce_weight, kl_weight and hidden_cosine_weight are all 0: nothing to train on")
        t = self.kl_temperature
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise ValueError(f"kl_temperature must be a finite number > 0, got {t!r}")
        if self.kl_mode not in KL_MODES:
            raise ValueError(f"kl_mode must be one of {KL_MODES}, got {self.kl_mode!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {self.chunk_size!r}")
        # YAML gives lists; store tuples so the config stays hashable and frozen.
        try:
            pairs = tuple((int(s), int(t)) for s, t in self.layer_pairs)
        except (TypeError, ValueError):
            raise ValueError(f"layer_pairs must be (student_layer, teacher_layer) pairs, got {self.layer_pairs!r}")
        if any(s < 1 or t < 1 for s, t in pairs):
            raise ValueError(f"layer_pairs are 1-based layer numbers, got {pairs}")
        if len(set(pairs)) != len(pairs):
            raise ValueError(f"layer_pairs has duplicates: {pairs}")
        if self.hidden_cosine_weight > 0 and not pairs:
            raise ValueError("hidden_cosine_weight > 0 needs layer_pairs")
        object.__setattr__(self, "layer_pairs", pairs)

    @property
    def hidden_pairs(self) -> tuple[tuple[int, int], ...]:
        """The layer pairs the hidden cosine loss compares (none while its weight is 0)."""
        return self.layer_pairs if self.hidden_cosine_weight > 0 else ()

    @property
    def teacher_layers(self) -> tuple[int, ...]:
        """Teacher layers whose cached hidden states the loss reads, ascending."""
        return tuple(sorted({t for _, t in self.hidden_pairs}))

    def distill_kwargs(self) -> dict:
        """The keyword arguments of `distill_loss` that this config sets."""
        return dict(ce_weight=self.ce_weight, kl_weight=self.kl_weight, kl_mode=self.kl_mode,
                    kl_temperature=self.kl_temperature, scale_by_t2=self.scale_by_t2,
                    chunk_size=self.chunk_size, compile_chunks=self.compile_chunks)


@dataclass(frozen=True)
class TopkTargets:
    ids_NK: Tensor  # int64, distinct per row, any order
    logits_NK: Tensor  # float32 teacher logits at T=1
    lse_NT: Tensor  # float32 full-vocabulary logsumexp(teacher_logits / T), one column per cached T
    lse_index: int  # the column of lse_NT whose T is the KL temperature

    def rows(self, index) -> "TopkTargets":
        return dataclasses.replace(self, ids_NK=self.ids_NK[index], logits_NK=self.logits_NK[index],
                                   lse_NT=self.lse_NT[index])

    def teacher_top1_N(self) -> Tensor:
        return self.ids_NK.gather(1, self.logits_NK.argmax(-1, keepdim=True)).squeeze(1)


@dataclass(frozen=True)
class SampledTargets:
    ids_NM: Tensor  # int64 distinct sampled ids, padded with -1
    counts_NM: Tensor  # draws per id, 0 where padded
    num_samples: int  # draws per position (N_s); the target probability is count / N_s

    def rows(self, index) -> "SampledTargets":
        return dataclasses.replace(self, ids_NM=self.ids_NM[index], counts_NM=self.counts_NM[index])

    def teacher_top1_N(self) -> Tensor:
        return self.ids_NM.gather(1, self.counts_NM.argmax(-1, keepdim=True)).squeeze(1)


Targets = TopkTargets | SampledTargets


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
) -> tuple[Tensor, dict[str, Tensor]]:
    """sum over positions with labels_N != -100 of (ce_weight*CE + kl_weight*s*KL_T), divided by
    num_valid_tokens_global; s = T**2 when scale_by_t2, else 1.

    Logits exist one chunk of chunk_size positions at a time, in forward and backward: the
    gradients are computed in forward and only [N, D] and [V, D] tensors are kept for backward.
    The metrics are detached sums over this call's valid positions: ce_sum, kl_sum (plain KL at
    temperature T, without the T**2 factor), valid_tokens, top1_agree_sum (student argmax ==
    teacher argmax). With targets None only CE is computed and kl_weight must be 0.

    Peak extra memory is about three [chunk_size, V] float32 buffers, plus a float32 [V, D]
    accumulator (and one [V, D] product in the weight's dtype) when the weight is trained. On an
    H100 with V=201,088, D=2880, 4096 bf16 positions, chunk 1024: 2.4 GiB frozen, 5.6 GiB trained.
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
    if not kl_temperature > 0:
        raise ValueError(f"kl_temperature must be > 0, got {kl_temperature}")
    vocab = weight_VD.shape[0]
    valid_N = labels_N != IGNORE_INDEX
    if bool(((labels_N < 0) & valid_N).any() | (labels_N >= vocab).any()):
        raise ValueError(f"labels must be -100 or in [0, {vocab})")
    if targets is None:
        if kl_weight != 0:
            raise ValueError("kl_weight > 0 needs teacher targets")
    else:
        _check_targets(targets, kl_mode, n, vocab)

    kl_scale = kl_temperature**2 if scale_by_t2 else 1.0
    loss, ce_sum, kl_sum, agree_sum, valid = _FusedLinearDistill.apply(
        hidden_ND, weight_VD, labels_N, targets, kl_mode, float(kl_temperature),
        ce_weight / num_valid_tokens_global, kl_weight * kl_scale / num_valid_tokens_global, chunk_size,
        torch.is_grad_enabled() and (hidden_ND.requires_grad or weight_VD.requires_grad), compile_chunks)
    metrics = dict(ce_sum=ce_sum, kl_sum=kl_sum, valid_tokens=valid, top1_agree_sum=agree_sum)
    return loss, metrics


def _check_targets(targets: Targets, kl_mode: str, n: int, vocab: int) -> None:
    if kl_mode not in KL_MODES:
        raise ValueError(f"kl_mode must be one of {KL_MODES}, got {kl_mode!r}")
    if isinstance(targets, TopkTargets):
        if kl_mode == "sampled":
            raise ValueError("kl_mode 'sampled' needs SampledTargets, got TopkTargets")
        ids, values = targets.ids_NK, targets.logits_NK
        if targets.lse_NT.dim() != 2 or targets.lse_NT.shape[0] != n:
            raise ValueError(f"teacher lse must be [{n}, T], got {tuple(targets.lse_NT.shape)}")
        if not 0 <= targets.lse_index < targets.lse_NT.shape[1]:
            raise ValueError(f"lse_index {targets.lse_index} out of range for {targets.lse_NT.shape[1]} "
                             "cached temperatures")
        lowest_id = 0
    elif isinstance(targets, SampledTargets):
        if kl_mode != "sampled":
            raise ValueError(f"kl_mode {kl_mode!r} needs TopkTargets, got SampledTargets")
        if targets.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {targets.num_samples}")
        ids, values = targets.ids_NM, targets.counts_NM
        lowest_id = -1  # padding
    else:
        raise ValueError(f"targets must be TopkTargets or SampledTargets, got {type(targets).__name__}")
    if ids.dim() != 2 or ids.shape[0] != n or values.shape != ids.shape or ids.dtype != torch.int64:
        raise ValueError(f"teacher ids must be int64 [{n}, K] with values of the same shape, got "
                         f"{ids.dtype} {tuple(ids.shape)} and {tuple(values.shape)}")
    if bool(((ids < lowest_id) | (ids >= vocab)).any()):
        raise ValueError(f"teacher ids must be in [{lowest_id}, {vocab})")


class _FusedLinearDistill(torch.autograd.Function):
    """Forward computes the loss and its gradients chunk by chunk; backward only rescales them."""

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, labels_N, targets, kl_mode, temperature, ce_coef, kl_coef,
                chunk_size, need_grads=True, compile_chunks=False):
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

        grad_hidden_ND = torch.zeros_like(hidden_ND) if need_grads else None
        # Summed over chunks in compute precision, stored in the weight's dtype below.
        grad_weight_VD = (torch.zeros(weight_VD.shape, dtype=compute_dtype, device=weight_VD.device)
                          if want_weight_grad else None)
        zero = hidden_ND.new_zeros((), dtype=compute_dtype)
        ce_sum, kl_sum, agree_sum = zero.clone(), zero.clone(), zero.clone()

        chunk_fn = _compiled_chunk_loss_and_grad() if compile_chunks else _chunk_loss_and_grad
        # Tensors, not floats: the coefficients change every step (they hold the global token count),
        # which would otherwise recompile a compiled chunk function each time.
        ce_coef_t, kl_coef_t = (torch.tensor(c, dtype=compute_dtype, device=hidden_ND.device)
                                for c in (ce_coef, kl_coef))
        for start in range(0, rows_R.numel(), chunk_size):
            chunk = slice(start, start + chunk_size)
            hidden_CD = hidden_RD[chunk]
            ce_C, kl_C, agree_C, grad_logits_CV = chunk_fn(
                hidden_CD @ weight_VD.T, labels_R[chunk], targets_R.rows(chunk) if targets_R is not None else None,
                kl_mode, temperature, ce_coef_t, kl_coef_t, compute_dtype)
            ce_sum += ce_C.sum()
            kl_sum += kl_C.sum()
            agree_sum += agree_C.sum()

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
        loss = ce_coef * ce_sum + kl_coef * kl_sum
        valid = zero + rows_R.numel()
        ctx.mark_non_differentiable(ce_sum, kl_sum, agree_sum, valid)
        return loss, ce_sum, kl_sum, agree_sum, valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_unused_metric_grads):
        grad_hidden_ND, grad_weight_VD = ctx.saved_tensors
        grad_hidden_ND = grad_hidden_ND * grad_loss.to(grad_hidden_ND.dtype)
        if grad_weight_VD is not None:
            grad_weight_VD = grad_weight_VD * grad_loss.to(grad_weight_VD.dtype)
        return grad_hidden_ND, grad_weight_VD, None, None, None, None, None, None, None, None, None


def _chunk_loss_and_grad(logits_mm_CV, labels_C, targets, kl_mode, temperature, ce_coef, kl_coef,
                         compute_dtype):
    """Per-position CE and KL, top-1 agreement, and d(loss)/d(logits), from the lm_head's output in its
    own dtype; ce_coef and kl_coef are 0-dim tensors."""
    logits_CV = logits_mm_CV.to(compute_dtype)
    lse_C = torch.logsumexp(logits_CV, -1)  # shared by CE and, at T=1, the KL
    ce_C = lse_C - logits_CV.gather(1, labels_C[:, None]).squeeze(1)

    kl_C = torch.zeros_like(lse_C)
    agree_C = torch.zeros_like(lse_C)
    dense_CV = sparse_ids_CK = sparse_grad_CK = None
    if targets is not None:
        kl_fn = {"tail": _kl_tail, "renorm": _kl_renorm, "sampled": _kl_sampled}[kl_mode]
        kl_C, dense_CV, sparse_ids_CK, sparse_grad_CK = kl_fn(logits_CV, lse_C, targets, temperature)
        agree_C = (logits_CV.argmax(-1) == targets.teacher_top1_N()).to(lse_C.dtype)

    # d/dlogits = ce_coef * (softmax - onehot) + kl_coef / T * dKL/d(logits / T)
    grad_CV = logits_CV.sub_(lse_C[:, None]).exp_().mul_(ce_coef)
    grad_CV.scatter_add_(1, labels_C[:, None], (-ce_coef).expand(labels_C.numel(), 1).to(grad_CV.dtype))
    if dense_CV is not None:
        grad_CV.add_(dense_CV.mul_(kl_coef / temperature))
    if sparse_ids_CK is not None:
        grad_CV.scatter_add_(1, sparse_ids_CK, sparse_grad_CK.mul_(kl_coef / temperature))
    return ce_C, kl_C, agree_C, grad_CV


_COMPILED_CHUNK = None


def _compiled_chunk_loss_and_grad():
    """_chunk_loss_and_grad under torch.compile, built once per process: the dozen passes over a
    [chunk, V] float32 buffer become a few fused kernels. Chunk lengths vary (the last chunk of a
    micro batch), so the chunk dimension is dynamic."""
    global _COMPILED_CHUNK
    if _COMPILED_CHUNK is None:
        _COMPILED_CHUNK = torch.compile(_chunk_loss_and_grad, dynamic=True)
    return _COMPILED_CHUNK


# Each KL returns (kl_C, dense_CV | None, ids_CK, grad_CK): dKL/d(student_logits / T) is dense_CV
# plus grad_CK added at ids_CK. Neither mutates logits_CV.


def _tempered(logits_CV, lse_C, temperature):
    """Student logits / T as a new buffer, and their logsumexp (reusing lse_C at T=1)."""
    if temperature == 1.0:
        return logits_CV.clone(), lse_C
    scaled_CV = logits_CV / temperature
    return scaled_CV, torch.logsumexp(scaled_CV, -1)


def _kl_tail(logits_CV, lse_C, targets: TopkTargets, temperature):
    """KL over K+1 buckets: the kept ids, and everything else as one tail bucket."""
    ids_CK = targets.ids_NK
    teacher_lse_C1 = targets.lse_NT[:, targets.lse_index, None].to(lse_C.dtype)
    logp_CK = targets.logits_NK.to(lse_C.dtype) / temperature - teacher_lse_C1  # exact tempered log-probs
    p_CK = logp_CK.exp()
    p_kept_C = p_CK.sum(-1)
    p_tail_C = (1 - p_kept_C).clamp_min(0)

    s_CV, lse_s_C = _tempered(logits_CV, lse_C, temperature)
    logq_CK = s_CV.gather(1, ids_CK) - lse_s_C[:, None]
    # The student's tail is the logsumexp over the non-kept ids, not 1 - sum(q): exact even when
    # the tail holds almost no mass, where 1 - sum(q) cancels to 0 or below.
    s_CV.scatter_(1, ids_CK, -math.inf)
    lse_tail_C = torch.logsumexp(s_CV, -1)
    # Every id kept: no tail bucket. The teacher's 1 - sum(p) is then only rounding noise, and
    # against the clamped log q_tail below it would add a spurious p_tail * 700.
    empty_tail_C = torch.isneginf(lse_tail_C)
    p_tail_C = p_tail_C.masked_fill(empty_tail_C, 0)
    tiny = torch.finfo(lse_C.dtype).tiny
    logq_tail_C = (lse_tail_C - lse_s_C).clamp_min(math.log(tiny))
    kl_C = (p_CK * (logp_CK - logq_CK)).sum(-1) + torch.xlogy(p_tail_C, p_tail_C) - p_tail_C * logq_tail_C

    # With mass_C = sum(p) + p_tail (1 up to rounding): dKL/ds_j = mass*q_j - p_j on kept ids and
    # mass*q_j - p_tail*r_j on the tail, r = softmax over the tail alone; as q_j = r_j*q_tail
    # there, the tail part is r_j*(mass*q_tail - p_tail), bounded however small q_tail is.
    mass_C = p_kept_C + p_tail_C
    lse_tail_C = lse_tail_C.masked_fill(empty_tail_C, 0)  # avoids -inf - -inf below; r is 0 anyway
    coef_C = mass_C * logq_tail_C.exp() - p_tail_C
    dense_CV = s_CV.sub_(lse_tail_C[:, None]).exp_().mul_(coef_C[:, None])  # 0 on kept ids
    grad_CK = mass_C[:, None] * logq_CK.exp() - p_CK
    return kl_C, dense_CV, ids_CK, grad_CK


def _kl_renorm(logits_CV, lse_C, targets: TopkTargets, temperature):
    """KL between teacher and student, both renormalised over the kept ids (biased; for comparison)."""
    ids_CK = targets.ids_NK
    logp_CK = torch.log_softmax(targets.logits_NK.to(lse_C.dtype) / temperature, -1)
    logq_CK = torch.log_softmax(logits_CV.gather(1, ids_CK) / temperature, -1)
    p_CK = logp_CK.exp()
    kl_C = (p_CK * (logp_CK - logq_CK)).sum(-1)
    grad_CK = p_CK.sum(-1, keepdim=True) * logq_CK.exp() - p_CK
    return kl_C, None, ids_CK, grad_CK


def _kl_sampled(logits_CV, lse_C, targets: SampledTargets, temperature):
    """KL of the sparse target count/N_s against the full student softmax (Sparse Logit Sampling)."""
    ids_CM = targets.ids_NM.clamp_min(0)  # padding has count 0, so any valid id will do
    p_CM = targets.counts_NM.to(lse_C.dtype) / targets.num_samples
    s_CV, lse_s_C = _tempered(logits_CV, lse_C, temperature)
    logq_CM = s_CV.gather(1, ids_CM) - lse_s_C[:, None]
    kl_C = (torch.xlogy(p_CM, p_CM) - p_CM * logq_CM).sum(-1)
    mass_C = p_CM.sum(-1)
    dense_CV = s_CV.sub_(lse_s_C[:, None]).exp_().mul_(mass_C[:, None])
    return kl_C, dense_CV, ids_CM, -p_CM


class HiddenProjection(nn.Linear):
    """Student width -> teacher width, no bias; the identity when the widths are equal."""

    def __init__(self, student_width: int, teacher_width: int, device=None, dtype=None):
        super().__init__(student_width, teacher_width, bias=False, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        # Also what FSDP calls after meta-device init, so the identity survives it.
        if self.in_features == self.out_features:
            with torch.no_grad():
                nn.init.eye_(self.weight)
        else:
            super().reset_parameters()


def build_hidden_projection(student_width: int, teacher_width: int, force: bool = False) -> HiddenProjection | None:
    """A projection when the widths differ or when asked for; None means compare directly."""
    if student_width < 1 or teacher_width < 1:
        raise ValueError(f"hidden widths must be >= 1, got {student_width} and {teacher_width}")
    if student_width == teacher_width and not force:
        return None
    return HiddenProjection(student_width, teacher_width)


def hidden_cosine_loss(
    student_hidden_ND: Tensor,
    teacher_hidden_NE: Tensor,
    mask_N: Tensor,
    projection: nn.Module | None,
    num_valid_global: float,
) -> Tensor:
    """sum over positions where mask_N of (1 - cos(projection(student), teacher)) / num_valid_global."""
    num_valid_global = float(num_valid_global)
    if not num_valid_global > 0:
        raise ValueError(f"num_valid_global must be > 0, got {num_valid_global}")
    n = student_hidden_ND.shape[0]
    if mask_N.shape != (n,) or mask_N.dtype != torch.bool or teacher_hidden_NE.shape[0] != n:
        raise ValueError(f"need student [N, D], teacher [N, E] and a bool mask [N], got "
                         f"{tuple(student_hidden_ND.shape)}, {tuple(teacher_hidden_NE.shape)}, "
                         f"{mask_N.dtype} {tuple(mask_N.shape)}")
    student_ME = student_hidden_ND[mask_N]
    if projection is not None:
        student_ME = projection(student_ME)
    teacher_ME = teacher_hidden_NE[mask_N]
    if student_ME.shape[-1] != teacher_ME.shape[-1]:
        raise ValueError(f"student width {student_ME.shape[-1]} != teacher width {teacher_ME.shape[-1]}: "
                         "pass a HiddenProjection")
    dtype = torch.promote_types(torch.promote_types(student_ME.dtype, teacher_ME.dtype), torch.float32)
    student_ME, teacher_ME = student_ME.to(dtype), teacher_ME.to(dtype)
    # Clamped norms: an all-zero row gives cos 0 and a finite gradient instead of nan.
    eps = 1e-8
    cos_M = (student_ME * teacher_ME).sum(-1) / (
        student_ME.norm(dim=-1).clamp_min(eps) * teacher_ME.norm(dim=-1).clamp_min(eps))
    return (1 - cos_M).sum() / num_valid_global
