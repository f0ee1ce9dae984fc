"""The divergences the KL term can use, one object each, by the name `loss.kl_mode` gives.

A divergence declares what it needs from the cache and supplies the per-position KL at
temperature T and its gradient with respect to the tempered student logits s = logits / T:

- `targets` (TopkTargets or SampledTargets) is the cache's targets mode it reads, and
  `needs_teacher_lse` whether the cache must hold the log-sum-exp at the KL temperature;
  `check_cache` turns both into errors that name the cache, before any training work.
- `value(scaled_CV, targets, temperature)` defines kl_C as a differentiable function of s; the
  default `value_and_grad` differentiates it with autograd (a few more [C, V] buffers per chunk).
- `value_and_grad(logits_CV, lse_C, targets, temperature)` overridden is a hand-derived gradient,
  the fast path: tail, renorm and sampled below. It returns (kl_C, dense_CV | None, ids_CK | None,
  grad_CK | None), dKL/ds being dense_CV plus grad_CK added at ids_CK, and never mutates logits_CV.

A new divergence is a subclass here under `@register`: the config's choices, the cache
check, the chunked loss (student_train/losses/chunked.py) and the float64 tests pick it up (the
tests differentiate its `value`; one with only a hand-derived gradient also needs its KL written
out in tests/test_losses.py, REFERENCE_KL).
Shape suffixes as in student_train/losses/__init__.py.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from student_train.losses.dense_targets import DenseTargets
from student_train.losses.targets import SampledTargets, TopkTargets, lse_column

DIVERGENCES: dict[str, Divergence] = {}  # by name, in registration order


class Divergence:
    """One KL the loss can use: what it reads from the cache, its value, its gradient."""

    name: str
    targets: type  # TopkTargets or SampledTargets
    needs_teacher_lse: bool = False

    def check_cache(self, targets_spec, loss, where: str) -> None:
        """ValueError naming the cache `where` when its targets (a common.spec.TargetSpec) cannot
        feed this divergence under the LossConfig `loss`."""
        mode = targets_spec.mode
        if mode != self.targets.cache_mode:
            fitting = " or ".join(name for name, d in DIVERGENCES.items() if d.targets.cache_mode == mode)
            hint = f" (use kl_mode: {fitting})" if fitting else ""
            raise ValueError(f"{where}: loss.kl_mode {self.name!r} needs a {self.targets.described} cache, "
                             f"this one holds {mode} targets{hint}")
        temps = targets_spec.temperatures
        if loss.kl_weight > 0 and self.needs_teacher_lse and lse_column(temps, loss.kl_temperature) is None:
            raise ValueError(f"{where}: loss.kl_temperature {loss.kl_temperature} is not among the cached "
                             f"log-sum-exp temperatures {list(temps)}; kl_mode {self.name!r} needs it")

    def check_targets(self, targets, n: int, vocab: int) -> None:
        if not isinstance(targets, self.targets):
            raise ValueError(f"kl_mode {self.name!r} needs {self.targets.__name__}, got {type(targets).__name__}")
        targets.check(n, vocab)

    def value(self, scaled_CV: Tensor, targets, temperature: float) -> Tensor:
        """kl_C from the student's logits / T, differentiable in them."""
        raise NotImplementedError(f"divergence {self.name!r} defines neither value nor value_and_grad")

    def value_and_grad(self, logits_CV, lse_C, targets, temperature):
        """Autograd through `value`. torch.func.grad also runs under an outer no_grad (eval) and
        is traced by torch.compile."""
        def summed(scaled_CV):
            kl_C = self.value(scaled_CV, targets, temperature)
            return kl_C.sum(), kl_C

        dense_CV, kl_C = torch.func.grad(summed, has_aux=True)(logits_CV / temperature)
        return kl_C, dense_CV, None, None


def register(cls: type[Divergence]) -> type[Divergence]:
    """Class decorator: puts one instance of the divergence in DIVERGENCES under its name."""
    if cls.name in DIVERGENCES:
        raise ValueError(f"a divergence named {cls.name!r} is already registered")
    DIVERGENCES[cls.name] = cls()
    return cls


def divergence_names() -> tuple[str, ...]:
    return tuple(DIVERGENCES)


def get_divergence(kl_mode: str) -> Divergence:
    if kl_mode not in DIVERGENCES:
        raise ValueError(f"kl_mode must be one of {divergence_names()}, got {kl_mode!r}")
    return DIVERGENCES[kl_mode]


def _tempered(logits_CV, lse_C, temperature):
    """Student logits / T as a new buffer, and their logsumexp (reusing lse_C at T=1)."""
    if temperature == 1.0:
        return logits_CV.clone(), lse_C
    scaled_CV = logits_CV / temperature
    return scaled_CV, torch.logsumexp(scaled_CV, -1)


@register
class Tail(Divergence):
    """KL over K+1 buckets: the kept ids, and everything else as one tail bucket."""

    name = "tail"
    targets = TopkTargets
    needs_teacher_lse = True  # the teacher's exact log-probabilities, hence its tail mass

    def value_and_grad(self, logits_CV, lse_C, targets: TopkTargets, temperature):
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


@register
class Renorm(Divergence):
    """KL between teacher and student, both renormalised over the kept ids (biased; for comparison)."""

    name = "renorm"
    targets = TopkTargets

    def value_and_grad(self, logits_CV, lse_C, targets: TopkTargets, temperature):
        ids_CK = targets.ids_NK
        logp_CK = torch.log_softmax(targets.logits_NK.to(lse_C.dtype) / temperature, -1)
        logq_CK = torch.log_softmax(logits_CV.gather(1, ids_CK) / temperature, -1)
        p_CK = logp_CK.exp()
        kl_C = (p_CK * (logp_CK - logq_CK)).sum(-1)
        grad_CK = p_CK.sum(-1, keepdim=True) * logq_CK.exp() - p_CK
        return kl_C, None, ids_CK, grad_CK


@register
class Sampled(Divergence):
    """KL of the sparse target count/N_s against the full student softmax (Sparse Logit Sampling)."""

    name = "sampled"
    targets = SampledTargets

    def check_cache(self, targets_spec, loss, where: str) -> None:
        super().check_cache(targets_spec, loss, where)
        if loss.kl_weight > 0 and abs(loss.kl_temperature - 1.0) > 1e-6:
            raise ValueError(f"{where}: sampled targets are draws at T=1; set loss.kl_temperature: 1.0")

    def value_and_grad(self, logits_CV, lse_C, targets: SampledTargets, temperature):
        ids_CM = targets.ids_NM.clamp_min(0)  # padding has count 0, so any valid id will do
        p_CM = targets.counts_NM.to(lse_C.dtype) / targets.num_samples
        s_CV, lse_s_C = _tempered(logits_CV, lse_C, temperature)
        logq_CM = s_CV.gather(1, ids_CM) - lse_s_C[:, None]
        kl_C = (torch.xlogy(p_CM, p_CM) - p_CM * logq_CM).sum(-1)
        mass_C = p_CM.sum(-1)
        dense_CV = s_CV.sub_(lse_s_C[:, None]).exp_().mul_(mass_C[:, None])
        return kl_C, dense_CV, ids_CM, -p_CM


@register
class Dense(Divergence):
    """Exact KL(teacher || student) over the full vocabulary, the teacher's logits rebuilt per chunk
    from its cached last-layer state (DenseTargets); other positions fall back to the cache's
    targets under the divergence below, or are skipped (`loss.dense_fallback`)."""

    name = "dense"
    targets = DenseTargets
    FALLBACK = {"topk": "tail", "sampled": "sampled"}  # cache targets mode -> the fallback's kl_mode

    def check_cache(self, targets_spec, loss, where: str) -> None:
        """The cache's targets must feed the fallback; the hidden layer and the head are checked
        where the manifest is read (student_train/trainer.py, dense_head_record)."""
        if loss.dense_fallback == "skip":
            return
        try:
            DIVERGENCES[self.FALLBACK[targets_spec.mode]].check_cache(targets_spec, loss, where)
        except ValueError as exc:
            raise ValueError(f"{exc} (the fallback of kl_mode 'dense' where no hidden state is stored; "
                             "or set loss.dense_fallback: skip)") from None

    def value_and_grad(self, logits_CV, lse_C, targets: DenseTargets, temperature):
        has_C = targets.has_hidden_N
        if bool(has_C.all()):  # every position of a full-fraction cache: no gather, no copy
            kl_C, dense_CV = _dense_kl(logits_CV, lse_C, targets.hidden_NE, targets.head, temperature)
            return kl_C, dense_CV, None, None
        kl_C = torch.zeros_like(lse_C)
        dense_CV = torch.zeros_like(logits_CV)
        rows_d = has_C.nonzero().squeeze(1)
        if rows_d.numel():
            kl_d, grad_d = _dense_kl(logits_CV[rows_d], lse_C[rows_d], targets.hidden_NE[rows_d], targets.head,
                                     temperature)
            kl_C[rows_d] = kl_d
            dense_CV[rows_d] = grad_d
        rows_f = (~has_C).nonzero().squeeze(1)
        if rows_f.numel() and not targets.skip_missing:
            fallback = targets.fallback.rows(rows_f)
            divergence = DIVERGENCES[self.FALLBACK[fallback.cache_mode]]
            kl_f, dense_f, ids_f, grad_f = divergence.value_and_grad(logits_CV[rows_f], lse_C[rows_f], fallback,
                                                                     temperature)
            kl_C[rows_f] = kl_f
            grad_f_CV = dense_f if dense_f is not None else torch.zeros_like(logits_CV[rows_f])
            if ids_f is not None:
                grad_f_CV.scatter_add_(1, ids_f, grad_f)
            dense_CV[rows_f] = grad_f_CV
        return kl_C, dense_CV, None, None


def _dense_kl(logits_CV, lse_C, hidden_CE, head, temperature):
    """(KL(p || q) per position, dKL/ds = q - p) with p the teacher's and q the student's softmax
    of logits / T, over the whole vocabulary; three [C, V] buffers."""
    logp_CV = head.logits(hidden_CE, logits_CV.dtype).div_(temperature)
    logp_CV -= torch.logsumexp(logp_CV, -1, keepdim=True)
    p_CV = logp_CV.exp()
    s_CV, lse_s_C = _tempered(logits_CV, lse_C, temperature)
    logq_CV = s_CV.sub_(lse_s_C[:, None])
    # p log p is 0 where p underflows: log p is finite (the teacher's logits are), so no 0 * inf.
    kl_C = torch.linalg.vecdot(p_CV, logp_CV.sub_(logq_CV))
    return kl_C, logq_CV.exp_().sub_(p_CV)
