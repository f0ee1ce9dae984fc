"""The distillation losses against naive float64 references on peaked teacher distributions.

Row n of hidden, labels and targets describes the same next token (the caller shifted);
the references below build full [N, V] logits and let autograd differentiate them.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from common.spec import TargetSpec
from common.teacher_head import TeacherHead
from student_train.losses.dense_targets import DenseTargets
from student_train.evaluate import summarise
from student_train.losses import (
    DIVERGENCES,
    Divergence,
    HiddenProjection,
    LossConfig,
    SampledTargets,
    TopkTargets,
    build_hidden_projection,
    distill_loss,
    divergence_names,
    hidden_cosine_loss,
    register,
)
from student_train.model import LossSums

N, V, D = 37, 1000, 24
TEMPERATURES = (1.0, 2.0)  # what a cache stores lse for; lse_index picks the KL temperature
NUM_SAMPLES = 50


# ---------------------------------------------------------------- fixtures


def teacher_logits(n, vocab, gen, sharpness=(1.5, 2.5)):
    """Zipf-like prior in a random order per row, with noise: top-1 prob about 0.25-0.85."""
    prior_V = -torch.log(torch.arange(1, vocab + 1, dtype=torch.float64))
    order_NV = torch.argsort(torch.rand(n, vocab, generator=gen), dim=1)
    s_N1 = torch.empty(n, 1, dtype=torch.float64).uniform_(*sharpness, generator=gen)
    noise_NV = 0.3 * torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    return s_N1 * prior_V[order_NV] + noise_NV + 5.0  # offset: logits are not log-probs


def topk_targets(logits_NV, k, dtype=torch.float32):
    """What a shard decodes to: ids ascending (so the top-1 is not column 0), float32 values."""
    ids_NK = logits_NV.topk(k, dim=1).indices.sort(dim=1).values
    lse_NT = torch.stack([torch.logsumexp(logits_NV / t, -1) for t in TEMPERATURES], 1)
    return TopkTargets(ids_NK, logits_NV.gather(1, ids_NK).to(dtype), lse_NT.to(dtype), 0)


def sampled_targets(logits_NV, gen, num_samples=NUM_SAMPLES):
    draws_NS = torch.multinomial(torch.softmax(logits_NV, -1), num_samples, replacement=True, generator=gen)
    rows = [torch.unique(d, return_counts=True) for d in draws_NS]
    m = max(len(ids) for ids, _ in rows)
    ids_NM = torch.full((len(rows), m), -1, dtype=torch.int64)
    counts_NM = torch.zeros((len(rows), m), dtype=torch.int64)
    for i, (ids, counts) in enumerate(rows):
        ids_NM[i, : len(ids)], counts_NM[i, : len(ids)] = ids, counts
    return SampledTargets(ids_NM, counts_NM, num_samples)


def dense_targets(n, vocab, gen, fallback, width=20, stored_fraction=0.75):
    """A teacher head (RMSNorm + lm_head, float64) and its last-layer states, stored at about
    `stored_fraction` of the positions; the others fall back to `fallback`."""
    head = TeacherHead(norm_weight_E=1 + 0.1 * torch.randn(width, generator=gen, dtype=torch.float64),
                       lm_head_VE=2.5 / math.sqrt(width) * torch.randn(vocab, width, generator=gen, dtype=torch.float64),
                       norm_eps=1e-5)
    hidden_NE = 3 * torch.randn(n, width, generator=gen, dtype=torch.float64)
    has_hidden_N = torch.rand(n, generator=gen) < stored_fraction
    return DenseTargets(hidden_NE, has_hidden_N, head, fallback, skip_missing=False)


def with_temperature(targets, temperature):
    if isinstance(targets, DenseTargets):
        return dataclasses.replace(targets, fallback=with_temperature(targets.fallback, temperature))
    if isinstance(targets, TopkTargets):
        return TopkTargets(targets.ids_NK, targets.logits_NK, targets.lse_NT, TEMPERATURES.index(temperature))
    return targets


def make_case(seed=0, n=N, vocab=V, width=D, dtype=torch.float64, k=16, masked_fraction=0.2):
    gen = torch.Generator().manual_seed(seed)
    t_logits_NV = teacher_logits(n, vocab, gen)
    hidden_ND = torch.randn(n, width, generator=gen, dtype=torch.float64)
    weight_VD = 0.5 * torch.randn(vocab, width, generator=gen, dtype=torch.float64)
    # A partly trained student: about half its rows already lean towards the teacher's top-1.
    lean_N1 = (torch.rand(n, 1, generator=gen) < 0.5).double()
    hidden_ND, weight_VD = (hidden_ND + 2 * lean_N1 * weight_VD[t_logits_NV.argmax(1)]).to(dtype), weight_VD.to(dtype)
    labels_N = torch.multinomial(torch.softmax(t_logits_NV, -1), 1, generator=gen).squeeze(1)
    labels_N[torch.rand(n, generator=gen) < masked_fraction] = -100
    by_kind = {TopkTargets: topk_targets(t_logits_NV, k), SampledTargets: sampled_targets(t_logits_NV, gen)}
    by_kind[DenseTargets] = dense_targets(n, vocab, gen, by_kind[TopkTargets])
    # Each registered divergence's targets under its name.
    targets = {name: by_kind[divergence.targets] for name, divergence in DIVERGENCES.items()}
    return dict(hidden=hidden_ND, weight=weight_VD, labels=labels_N, teacher=t_logits_NV, targets=targets)


def run(hidden_ND, weight_VD, labels_N, targets, num_valid, weight_grad=True, **kwargs):
    hidden_ND = hidden_ND.detach().clone().requires_grad_(True)
    weight_VD = weight_VD.detach().clone().requires_grad_(weight_grad)
    loss, metrics = distill_loss(hidden_ND, weight_VD, labels_N, targets, num_valid, **kwargs)
    loss.backward()
    return loss.detach(), hidden_ND.grad, weight_VD.grad, metrics


# ---------------------------------------------------------------- float64 references


def reference_tail_kl(scaled_RV, targets: TopkTargets, t):
    """The kept ids and one bucket for the rest, the student's tail as 1 - sum(q)."""
    q = F.log_softmax(scaled_RV, -1).exp().gather(1, targets.ids_NK)
    p = torch.exp(targets.logits_NK.double() / t - targets.lse_NT[:, targets.lse_index, None].double())
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    q_tail = 1 - q.sum(-1)
    return (p * (p.log() - q.log())).sum(-1) + torch.xlogy(p_tail, p_tail) - p_tail * q_tail.log()


def reference_renorm_kl(scaled_RV, targets: TopkTargets, t):
    q = F.log_softmax(scaled_RV, -1).exp().gather(1, targets.ids_NK)
    p = torch.softmax(targets.logits_NK.double() / t, -1)
    q = q / q.sum(-1, keepdim=True)
    return (p * (p.log() - q.log())).sum(-1)


def reference_sampled_kl(scaled_RV, targets: SampledTargets, t):
    """Row by row over the drawn ids, in Python."""
    log_q = F.log_softmax(scaled_RV, -1)
    terms = []
    for j in range(log_q.shape[0]):
        pairs = [(i, c) for i, c in zip(targets.ids_NM[j].tolist(), targets.counts_NM[j].tolist()) if c > 0]
        terms.append(sum((c / targets.num_samples) * (math.log(c / targets.num_samples) - log_q[j, i])
                         for i, c in pairs))
    return torch.stack(terms)


def reference_dense_teacher_logits(targets: DenseTargets):
    """The teacher's logits from its last-layer states, naively in float64: RMSNorm, then lm_head."""
    h_NE = targets.hidden_NE.double()
    normed_NE = h_NE / torch.sqrt((h_NE**2).mean(-1, keepdim=True) + targets.head.norm_eps)
    return (normed_NE * targets.head.norm_weight_E.double()) @ targets.head.lm_head_VE.double().T


def reference_dense_kl(scaled_RV, targets: DenseTargets, t):
    """Full-softmax KL(teacher || student) where a state is stored, the fallback's reference elsewhere."""
    log_p = F.log_softmax(reference_dense_teacher_logits(targets) / t, -1)
    dense_R = (log_p.exp() * (log_p - F.log_softmax(scaled_RV, -1))).sum(-1)
    fallback = REFERENCE_KL["tail" if isinstance(targets.fallback, TopkTargets) else "sampled"]
    fallback_R = torch.zeros_like(dense_R) if targets.skip_missing else fallback(scaled_RV, targets.fallback, t)
    return torch.where(targets.has_hidden_N, dense_R, fallback_R)


# The built-in divergences written out directly, from full float64 softmaxes.
REFERENCE_KL = {"tail": reference_tail_kl, "renorm": reference_renorm_kl, "sampled": reference_sampled_kl,
                "dense": reference_dense_kl}


def reference_kl(kl_mode):
    """A divergence's hand-written KL, else its own `value` (differentiated by autograd on full logits)."""
    if kl_mode in REFERENCE_KL:
        return REFERENCE_KL[kl_mode]
    divergence = DIVERGENCES[kl_mode]
    if type(divergence).value is Divergence.value:
        pytest.fail(f"divergence {kl_mode!r}: give it a value, or a hand-written KL in REFERENCE_KL")
    return divergence.value


def reference_top1(targets):
    if isinstance(targets, DenseTargets):  # the metric reads the cache's own targets
        return reference_top1(targets.fallback)
    if isinstance(targets, TopkTargets):
        return targets.ids_NK.gather(1, targets.logits_NK.double().argmax(1, keepdim=True)).squeeze(1)
    return torch.tensor([max(((i, c) for i, c in zip(ids.tolist(), counts.tolist()) if c > 0),
                             key=lambda ic: ic[1])[0]
                         for ids, counts in zip(targets.ids_NM, targets.counts_NM)], dtype=torch.int64)


def reference(hidden_ND, weight_VD, labels_N, targets, num_valid, *, kl_mode="tail", ce_weight=1.0,
              kl_weight=1.0, kl_temperature=1.0, scale_by_t2=True, full_teacher_NV=None, chunk_size=None):
    """Full logits in float64, the KL from reference_kl. full_teacher_NV: full-vocab KL."""
    h = hidden_ND.detach().double().requires_grad_(True)
    w = weight_VD.detach().double().requires_grad_(True)
    t = kl_temperature
    keep = labels_N != -100
    logits = (h @ w.T)[keep]
    ce = F.cross_entropy(logits, labels_N[keep], reduction="sum")

    kl = torch.zeros(logits.shape[0], dtype=torch.float64)
    teacher_top1 = None
    if full_teacher_NV is not None:
        log_p = F.log_softmax(full_teacher_NV[keep] / t, -1)
        kl = (log_p.exp() * (log_p - F.log_softmax(logits / t, -1))).sum(-1)
    elif targets is not None:
        targets_R = targets.rows(keep)
        kl = reference_kl(kl_mode)(logits / t, targets_R, t)
        teacher_top1 = reference_top1(targets_R)

    scale = t**2 if scale_by_t2 else 1.0
    loss = (ce_weight * ce + kl_weight * scale * kl.sum()) / num_valid
    loss.backward()
    agree = None if teacher_top1 is None else (logits.argmax(-1) == teacher_top1).sum().item()
    return loss.detach(), h.grad, w.grad, dict(ce_sum=ce.item(), kl_sum=kl.sum().item(), agree=agree)


def assert_close(actual, expected, rtol, name):
    """Relative to the largest entry: gradients have many near-zero entries."""
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rtol * scale, f"{name}: max error {err:.3g} vs scale {scale:.3g}"


# ---------------------------------------------------------------- fixtures are realistic


def test_teacher_fixture_is_peaked_and_student_is_not_degenerate():
    case = make_case()
    top1_N = torch.softmax(case["teacher"], -1).max(-1).values
    assert 0.2 < top1_N.min() and top1_N.max() < 0.85 and 0.3 < top1_N.median() < 0.8
    assert case["hidden"].abs().min() > 0 and case["weight"].std() > 0.3
    assert (case["labels"] == -100).any() and (case["labels"] != -100).sum() > N // 2
    agree_N = (case["hidden"] @ case["weight"].T).argmax(1) == case["teacher"].argmax(1)
    assert 0.2 * N < agree_N.sum() < 0.8 * N
    counts_NM = case["targets"]["sampled"].counts_NM
    assert (counts_NM.sum(1) == NUM_SAMPLES).all() and (counts_NM > 0).sum(1).float().mean() > 5


# ---------------------------------------------------------------- value and gradients vs float64


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])  # 1 and 7 do not divide the ~30 valid rows
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kl_mode", ["ce_only", *divergence_names()])
def test_matches_float64_reference(kl_mode, temperature, chunk_size):
    case = make_case(seed=1)
    if kl_mode == "ce_only":
        targets, kwargs = None, dict(ce_weight=0.7, kl_weight=0.0)
    else:
        targets = with_temperature(case["targets"][kl_mode], temperature)
        kwargs = dict(ce_weight=0.7, kl_weight=1.3, kl_mode=kl_mode, kl_temperature=temperature)
    num_valid = 50  # a global count larger than this call's ~30 valid rows
    loss, g_hidden, g_weight, metrics = run(case["hidden"], case["weight"], case["labels"], targets, num_valid,
                                            chunk_size=chunk_size, **kwargs)
    ref_loss, ref_hidden, ref_weight, ref_metrics = reference(case["hidden"], case["weight"], case["labels"],
                                                              targets, num_valid, **kwargs)

    assert loss.dtype == torch.float64
    assert torch.allclose(loss, ref_loss, rtol=1e-9, atol=0)
    assert_close(g_hidden, ref_hidden, 1e-9, "hidden grad")
    assert_close(g_weight, ref_weight, 1e-9, "weight grad")
    assert metrics["valid_tokens"].item() == (case["labels"] != -100).sum().item()
    assert metrics["ce_sum"].item() == pytest.approx(ref_metrics["ce_sum"], rel=1e-9)
    assert metrics["kl_sum"].item() == pytest.approx(ref_metrics["kl_sum"], rel=1e-9, abs=1e-12)
    if ref_metrics["agree"] is not None:
        assert metrics["top1_agree_sum"].item() == ref_metrics["agree"]
    for value in metrics.values():
        assert not value.requires_grad


@pytest.mark.parametrize("kl_mode", divergence_names())
def test_float32_inputs_match_float64_reference(kl_mode):
    case = make_case(seed=2, dtype=torch.float32)
    targets = with_temperature(case["targets"][kl_mode], 2.0)
    kwargs = dict(kl_mode=kl_mode, kl_temperature=2.0, chunk_size=8)
    loss, g_hidden, g_weight, _ = run(case["hidden"], case["weight"], case["labels"], targets, 40, **kwargs)
    ref_loss, ref_hidden, ref_weight, _ = reference(case["hidden"], case["weight"], case["labels"], targets, 40,
                                                    **kwargs)
    assert loss.dtype == torch.float32 and g_hidden.dtype == torch.float32 and g_weight.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert_close(g_hidden, ref_hidden, 1e-5, "hidden grad")
    assert_close(g_weight, ref_weight, 1e-5, "weight grad")


def test_compiled_chunks_match_the_float64_reference_across_steps():
    """torch.compile'd per-chunk loss (compile_chunks): same loss and gradients as the float64
    reference in every mode, and no recompilation when the global token count changes per step."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    modes = ("tail", "renorm", "sampled")
    for kl_mode in modes:
        case = make_case(seed=2, dtype=torch.float32)
        temperature = 1.0 if kl_mode == "sampled" else 2.0
        targets = with_temperature(case["targets"][kl_mode], temperature)
        for num_valid in (40, 37):
            kwargs = dict(kl_mode=kl_mode, kl_temperature=temperature, chunk_size=8)
            loss, g_hidden, g_weight, _ = run(case["hidden"], case["weight"], case["labels"], targets, num_valid,
                                              compile_chunks=True, **kwargs)
            ref_loss, ref_hidden, ref_weight, _ = reference(case["hidden"], case["weight"], case["labels"],
                                                            targets, num_valid, **kwargs)
            assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5), kl_mode
            assert_close(g_hidden, ref_hidden, 1e-5, f"{kl_mode} hidden grad")
            assert_close(g_weight, ref_weight, 1e-5, f"{kl_mode} weight grad")
    # One graph per mode (chunk lengths are dynamic; coefficients are tensors), not one per step.
    assert counters["stats"]["unique_graphs"] <= len(modes), dict(counters["stats"])


@pytest.mark.parametrize("weight_grad", [False, True])
def test_bf16_weight_frozen_or_trained(weight_grad):
    case = make_case(seed=3, dtype=torch.bfloat16)
    targets = case["targets"]["tail"]
    loss, g_hidden, g_weight, _ = run(case["hidden"], case["weight"], case["labels"], targets, 40,
                                      weight_grad=weight_grad, chunk_size=8)
    ref_loss, ref_hidden, ref_weight, _ = reference(case["hidden"], case["weight"], case["labels"], targets, 40)
    assert loss.dtype == torch.float32 and g_hidden.dtype == torch.bfloat16
    # bf16 logits carry ~3 significant digits; these bounds still catch any real error.
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-2)
    assert_close(g_hidden, ref_hidden, 3e-2, "hidden grad")
    if weight_grad:
        assert g_weight.dtype == torch.bfloat16
        assert_close(g_weight, ref_weight, 3e-2, "weight grad")
    else:
        assert g_weight is None


def test_t_squared_scaling():
    case = make_case(seed=4)
    targets = with_temperature(case["targets"]["tail"], 2.0)
    common = dict(ce_weight=0.0, kl_mode="tail", kl_temperature=2.0)
    scaled, g_scaled, _, _ = run(case["hidden"], case["weight"], case["labels"], targets, 30, **common)
    plain, g_plain, _, metrics = run(case["hidden"], case["weight"], case["labels"], targets, 30,
                                     scale_by_t2=False, **common)
    assert scaled.item() == pytest.approx(4 * plain.item(), rel=1e-12)
    assert plain.item() == pytest.approx(metrics["kl_sum"].item() / 30, rel=1e-12)
    assert torch.allclose(g_scaled, 4 * g_plain, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- divergences


class ByValue(Divergence):
    """A built-in divergence given by its reference KL alone: gradients from the default autograd path."""

    def __init__(self, kl_mode):
        fast = DIVERGENCES[kl_mode]
        self.name, self.targets, self.needs_teacher_lse = f"{kl_mode}_by_value", fast.targets, fast.needs_teacher_lse
        self.kl_fn = REFERENCE_KL[kl_mode]

    def value(self, scaled_CV, targets, temperature):
        return self.kl_fn(scaled_CV, targets, temperature)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kl_mode", sorted(REFERENCE_KL))
def test_a_divergence_defined_by_value_matches_its_hand_derived_gradient(kl_mode, temperature, monkeypatch):
    by_value = ByValue(kl_mode)
    monkeypatch.setitem(DIVERGENCES, by_value.name, by_value)
    case = make_case(seed=17)
    targets = with_temperature(case["targets"][kl_mode], temperature)
    args = (case["hidden"], case["weight"], case["labels"], targets, 50)
    kwargs = dict(ce_weight=0.7, kl_weight=1.3, kl_temperature=temperature, chunk_size=7)
    loss, g_hidden, g_weight, metrics = run(*args, kl_mode=kl_mode, **kwargs)
    loss_v, g_hidden_v, g_weight_v, metrics_v = run(*args, kl_mode=by_value.name, **kwargs)
    assert loss_v.item() == pytest.approx(loss.item(), rel=1e-12)
    assert_close(g_hidden_v, g_hidden, 1e-10, "hidden grad")
    assert_close(g_weight_v, g_weight, 1e-10, "weight grad")
    for key, value in metrics.items():
        assert metrics_v[key].item() == pytest.approx(value.item(), rel=1e-12, abs=1e-14), key
    with torch.no_grad():  # eval: the autograd path runs under no_grad too
        eval_loss, _ = distill_loss(*args, kl_mode=by_value.name, **kwargs)
    assert torch.equal(eval_loss, loss_v)


def test_a_divergence_defined_by_value_compiles(monkeypatch):
    """compile_chunks traces the autograd path as well."""
    by_value = ByValue("tail")
    monkeypatch.setitem(DIVERGENCES, by_value.name, by_value)
    case = make_case(seed=18, dtype=torch.float32)
    targets = with_temperature(case["targets"]["tail"], 2.0)
    args = (case["hidden"], case["weight"], case["labels"], targets, 40)
    kwargs = dict(kl_temperature=2.0, chunk_size=8)
    loss, g_hidden, g_weight, _ = run(*args, kl_mode="tail", **kwargs)
    loss_v, g_hidden_v, g_weight_v, _ = run(*args, kl_mode=by_value.name, compile_chunks=True, **kwargs)
    assert loss_v.item() == pytest.approx(loss.item(), rel=1e-5)
    assert_close(g_hidden_v, g_hidden, 1e-5, "hidden grad")
    assert_close(g_weight_v, g_weight, 1e-5, "weight grad")


# dense reads any cache with a dense_head; its fallback's checks are in tests/test_dense_kl.py.
@pytest.mark.parametrize("kl_mode", [name for name in divergence_names() if name != "dense"])
def test_every_divergence_names_the_cache_it_cannot_read(kl_mode):
    divergence = DIVERGENCES[kl_mode]
    mode = divergence.targets.cache_mode
    other = TargetSpec(mode="sampled", num_samples=8) if mode == "topk" else TargetSpec(mode="topk")
    loss = LossConfig(kl_mode=kl_mode)
    with pytest.raises(ValueError, match=f"^caches/x: loss.kl_mode '{kl_mode}' needs a .* cache, this one "
                                         f"holds {other.mode} targets"):
        divergence.check_cache(other, loss, "caches/x")
    fitting = TargetSpec(mode=mode, num_samples=8, temperatures=(1.0, 2.0))
    divergence.check_cache(fitting, loss, "caches/x")
    uncached = LossConfig(kl_mode=kl_mode, kl_temperature=3.0)
    if divergence.needs_teacher_lse:
        with pytest.raises(ValueError, match="^caches/x: loss.kl_temperature 3.0 is not among the cached"):
            divergence.check_cache(fitting, uncached, "caches/x")
    with pytest.raises(ValueError, match="already registered"):
        register(type(divergence))


def test_eval_summary_weighs_ce_and_kl_as_the_training_loss_does():
    """One objective: evaluate.summarise of the sums gives distill_loss's loss, T**2 included."""
    case = make_case(seed=19)
    cfg = LossConfig(ce_weight=0.7, kl_weight=1.3, kl_temperature=2.0)
    targets = with_temperature(case["targets"]["tail"], 2.0)
    num_valid = (case["labels"] != -100).sum().item()
    loss, _, _, metrics = run(case["hidden"], case["weight"], case["labels"], targets, num_valid,
                              **cfg.distill_kwargs())
    sums_F = torch.tensor([metrics[key].item() if key in metrics else 0.0 for key in LossSums.FIELDS],
                          dtype=torch.float64)
    assert summarise(sums_F, cfg)["loss"] == pytest.approx(loss.item(), rel=1e-12)


# ---------------------------------------------------------------- the tail bucket


def test_tail_kl_with_every_id_kept_is_the_full_vocabulary_kl():
    case = make_case(seed=5, k=V)  # the tail bucket is empty and its teacher mass rounds to ~0
    for temperature in TEMPERATURES:
        targets = with_temperature(case["targets"]["tail"], temperature)
        kwargs = dict(ce_weight=0.0, kl_temperature=temperature, chunk_size=10)
        loss, g_hidden, g_weight, metrics = run(case["hidden"], case["weight"], case["labels"], targets, 30,
                                                kl_mode="tail", **kwargs)
        ref_loss, ref_hidden, ref_weight, ref_metrics = reference(
            case["hidden"], case["weight"], case["labels"], None, 30, full_teacher_NV=case["teacher"], **kwargs)
        assert torch.isfinite(g_hidden).all() and torch.isfinite(g_weight).all()
        # float32-stored teacher logits and lse: agreement to ~1e-6, not 1e-12
        assert metrics["kl_sum"].item() == pytest.approx(ref_metrics["kl_sum"], rel=1e-5)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
        assert_close(g_hidden, ref_hidden, 1e-5, "hidden grad")
        assert_close(g_weight, ref_weight, 1e-5, "weight grad")
        # and renormalising over every id is the same thing
        renorm, *_ = run(case["hidden"], case["weight"], case["labels"], targets, 30, kl_mode="renorm", **kwargs)
        assert renorm.item() == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tail_with_almost_no_mass_stays_finite(dtype):
    """Teacher and student both put all but ~1e-20 of their mass on the kept ids, where
    1 - sum(q) cancels to 0 (or below): the tail KL must stay finite and approach the renorm KL."""
    case = make_case(seed=6, dtype=dtype, k=4)
    hidden_ND = 30 * case["hidden"]  # student logits spread ~70: nearly one-hot
    teacher_NV = 1.1 * (hidden_ND.double() @ case["weight"].double().T)  # same order, a little sharper
    # Stored relative to the row max, as the cache stores gaps; the teacher's 1 - sum(p) then has
    # ~1e-7 of float32 rounding, which is what limits the agreement in float32.
    targets = topk_targets(teacher_NV - teacher_NV.max(1, keepdim=True).values, 4)
    kl = {}
    for kl_mode in ("tail", "renorm"):
        loss, g_hidden, g_weight, metrics = run(hidden_ND, case["weight"], case["labels"], targets, 30,
                                                ce_weight=0.0, kl_mode=kl_mode)
        assert torch.isfinite(loss) and torch.isfinite(g_hidden).all() and torch.isfinite(g_weight).all()
        kl[kl_mode] = metrics["kl_sum"].item()
    assert kl["tail"] > 0 and kl["tail"] == pytest.approx(kl["renorm"], rel=5e-3)


def test_kl_is_zero_when_student_equals_teacher_and_rows_are_not_mixed_up():
    case = make_case(seed=7)
    student_NV = case["hidden"] @ case["weight"].T  # use the student's own logits as the teacher's
    lse_NT = torch.stack([torch.logsumexp(student_NV / t, -1) for t in TEMPERATURES], 1)
    ids_NK = student_NV.topk(8, dim=1).indices.sort(dim=1).values
    for kl_mode in ("tail", "renorm"):
        targets = TopkTargets(ids_NK, student_NV.gather(1, ids_NK), lse_NT, lse_index=1)  # T = 2
        kwargs = dict(ce_weight=0.0, kl_mode=kl_mode, kl_temperature=2.0, chunk_size=5)
        loss, g_hidden, g_weight, metrics = run(case["hidden"], case["weight"], case["labels"], targets, 30,
                                                **kwargs)
        assert abs(metrics["kl_sum"].item()) < 1e-12 and abs(loss.item()) < 1e-12
        assert g_hidden.abs().max() < 1e-12 and g_weight.abs().max() < 1e-12
        assert metrics["top1_agree_sum"].item() == metrics["valid_tokens"].item()
        # row n's target belongs to row n: shifting the targets by one position is a large KL
        rolled = TopkTargets(ids_NK.roll(1, 0), targets.logits_NK.roll(1, 0), lse_NT.roll(1, 0), 1)
        _, _, _, rolled_metrics = run(case["hidden"], case["weight"], case["labels"], rolled, 30, **kwargs)
        assert rolled_metrics["kl_sum"].item() > 1.0


def test_renorm_differs_from_tail_when_the_tail_is_heavy():
    case = make_case(seed=8)
    flat_NV = teacher_logits(N, V, torch.Generator().manual_seed(9), sharpness=(0.3, 0.5))
    targets = topk_targets(flat_NV, 4)
    tail_mass_N = 1 - torch.exp(targets.logits_NK.double() - targets.lse_NT[:, :1].double()).sum(1)
    assert tail_mass_N.min() > 0.5
    kl = {}
    for kl_mode in ("tail", "renorm"):
        _, _, _, metrics = run(case["hidden"], case["weight"], case["labels"], targets, 30, ce_weight=0.0,
                               kl_mode=kl_mode)
        kl[kl_mode] = metrics["kl_sum"].item()
    assert abs(kl["tail"] - kl["renorm"]) > 0.2 * max(kl.values())


# ---------------------------------------------------------------- masking and normalisation


@pytest.mark.parametrize("kl_mode", ["tail", "sampled"])
def test_masked_positions_add_no_loss_and_no_gradient(kl_mode):
    case = make_case(seed=10, masked_fraction=0.4)
    masked_N = case["labels"] == -100
    targets = case["targets"][kl_mode]
    loss, g_hidden, _, _ = run(case["hidden"], case["weight"], case["labels"], targets, 30, kl_mode=kl_mode,
                               chunk_size=4)
    assert masked_N.sum() >= 5
    assert torch.equal(g_hidden[masked_N], torch.zeros_like(g_hidden[masked_N]))
    assert (g_hidden[~masked_N].abs().sum(1) > 0).all()
    # whatever sits at masked rows, hidden state or teacher target, changes nothing
    hidden_ND = torch.where(masked_N[:, None], torch.randn(N, D, dtype=torch.float64), case["hidden"])
    rows_N = torch.arange(N)
    masked_rows = rows_N[masked_N]
    rows_N[masked_rows] = masked_rows.roll(1)  # masked rows swap targets among themselves
    mixed = targets.rows(rows_N)
    loss2, g_hidden2, _, _ = run(hidden_ND, case["weight"], case["labels"], mixed, 30, kl_mode=kl_mode,
                                 chunk_size=4)
    assert torch.equal(loss, loss2) and torch.equal(g_hidden[~masked_N], g_hidden2[~masked_N])


def test_all_positions_masked_gives_zero_loss_and_gradient():
    case = make_case(seed=12)
    labels_N = torch.full((N,), -100)
    loss, g_hidden, g_weight, metrics = run(case["hidden"], case["weight"], labels_N, case["targets"]["tail"], 10)
    assert loss.item() == 0 and metrics["valid_tokens"].item() == 0
    assert not g_hidden.any() and not g_weight.any()


@pytest.mark.parametrize("kl_mode", divergence_names())
def test_two_calls_with_the_global_count_add_up_to_one_call(kl_mode):
    case = make_case(seed=13)
    targets = case["targets"][kl_mode]
    num_valid = (case["labels"] != -100).sum().item()
    kwargs = dict(kl_mode=kl_mode, kl_temperature=1.0, chunk_size=6)
    full, g_hidden, g_weight, metrics = run(case["hidden"], case["weight"], case["labels"], targets, num_valid,
                                            **kwargs)
    parts = [run(case["hidden"][rows], case["weight"], case["labels"][rows], targets.rows(rows), num_valid,
                 **kwargs) for rows in (slice(0, 20), slice(20, N))]
    assert (parts[0][0] + parts[1][0]).item() == pytest.approx(full.item(), rel=1e-12)
    assert torch.allclose(torch.cat([parts[0][1], parts[1][1]]), g_hidden, rtol=1e-12, atol=1e-15)
    assert torch.allclose(parts[0][2] + parts[1][2], g_weight, rtol=1e-10, atol=1e-15)
    for key, value in metrics.items():
        assert (parts[0][3][key] + parts[1][3][key]).item() == pytest.approx(value.item(), rel=1e-12)


# ---------------------------------------------------------------- memory


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("weight_grad", [True, False])
@pytest.mark.parametrize("kl_mode", divergence_names())
def test_nothing_of_size_positions_by_vocab_is_created_or_saved(kl_mode, weight_grad):
    n, vocab, width, chunk = 120, 500, 16, 8
    case = make_case(seed=14, n=n, vocab=vocab, width=width, dtype=torch.float32)
    hidden_ND = case["hidden"].requires_grad_(True)
    weight_VD = case["weight"].requires_grad_(weight_grad)
    with LargestOutput() as mode:
        loss, _ = distill_loss(hidden_ND, weight_VD, case["labels"], case["targets"][kl_mode], 100,
                               kl_mode=kl_mode, chunk_size=chunk)
    # one chunk of logits is the largest thing made; a full [N, V] would be 60,000 elements
    # (dense: the matmul's transposed view of the teacher's existing [V, E] head is as large as it)
    teacher_head = vocab * case["targets"]["dense"].head.width if kl_mode == "dense" else 0
    assert mode.largest <= max(chunk * vocab, vocab * width, n * width, teacher_head)
    saved = [t for t in loss.grad_fn.saved_tensors if t is not None]
    saved += [t for t in vars(loss.grad_fn).values() if isinstance(t, torch.Tensor)]
    expected = [(n, width), (vocab, width)] if weight_grad else [(n, width)]
    assert sorted(tuple(t.shape) for t in saved) == expected


# ---------------------------------------------------------------- hidden states


def cosine_reference(student_ND, teacher_NE, mask_N, proj_weight_ED, num_valid):
    s = student_ND.detach().double().requires_grad_(True)
    w = None if proj_weight_ED is None else proj_weight_ED.detach().double().requires_grad_(True)
    total = torch.zeros((), dtype=torch.float64)
    for row in mask_N.nonzero().squeeze(1).tolist():
        a = s[row] if w is None else w @ s[row]
        b = teacher_NE[row].double()
        total = total + 1 - torch.dot(a, b) / (a.norm() * b.norm())
    loss = total / num_valid
    loss.backward()
    return loss.detach(), s.grad, None if w is None else w.grad


@pytest.mark.parametrize("teacher_width", [16, 24])
def test_hidden_cosine_matches_float64_reference(teacher_width):
    gen = torch.Generator().manual_seed(15)
    student_ND = torch.randn(N, 16, generator=gen).requires_grad_(True)
    teacher_NE = torch.randn(N, teacher_width, generator=gen)
    teacher_NE[:, :16] += 2 * student_ND.detach()  # related, as a distilled student's states are
    mask_N = torch.rand(N, generator=gen) < 0.7
    projection = build_hidden_projection(16, teacher_width, force=True)
    with torch.no_grad():
        projection.weight.add_(0.1 * torch.randn(projection.weight.shape, generator=gen))
    loss = hidden_cosine_loss(student_ND, teacher_NE, mask_N, projection, 40)
    loss.backward()
    ref_loss, ref_student, ref_proj = cosine_reference(student_ND, teacher_NE, mask_N, projection.weight, 40)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert_close(student_ND.grad, ref_student, 1e-5, "student grad")
    assert_close(projection.weight.grad, ref_proj, 1e-5, "projection grad")
    assert not student_ND.grad[~mask_N].any()


def test_hidden_projection_is_identity_when_widths_match():
    assert build_hidden_projection(16, 16) is None
    assert isinstance(build_hidden_projection(16, 24), HiddenProjection)
    projection = build_hidden_projection(16, 16, force=True)
    x_ND = torch.randn(N, 16)
    assert torch.equal(projection(x_ND), x_ND) and projection.bias is None
    teacher_ND = torch.randn(N, 16)
    mask_N = torch.ones(N, dtype=torch.bool)
    with_projection = hidden_cosine_loss(x_ND, teacher_ND, mask_N, projection, N)
    without = hidden_cosine_loss(x_ND, teacher_ND, mask_N, None, N)
    ref, _, _ = cosine_reference(x_ND, teacher_ND, mask_N, None, N)
    assert with_projection.item() == pytest.approx(without.item(), rel=1e-6)
    assert without.item() == pytest.approx(ref.item(), rel=1e-6)
    with pytest.raises(ValueError, match="width"):
        hidden_cosine_loss(x_ND, torch.randn(N, 24), mask_N, None, N)


# ---------------------------------------------------------------- configuration and user errors


def test_loss_config_defaults_and_yaml_lists():
    config = LossConfig(hidden_cosine_weight=0.5, layer_pairs=[[12, 24], [6, 12]])
    assert config.layer_pairs == ((12, 24), (6, 12)) and config.kl_mode == "tail"
    assert config.distill_kwargs()["kl_temperature"] == 1.0


@pytest.mark.parametrize("bad, key", [
    (dict(ce_weight=-1.0), "ce_weight"),
    (dict(kl_weight=float("nan")), "kl_weight"),
    (dict(hidden_cosine_weight="1"), "hidden_cosine_weight"),
    (dict(ce_weight=0.0, kl_weight=0.0), "all 0"),
    (dict(kl_temperature=0.0), "kl_temperature"),
    (dict(kl_mode="full"), "kl_mode"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(layer_pairs=[(0, 3)]), "layer_pairs"),
    (dict(layer_pairs=[(1, 2, 3)]), "layer_pairs"),
    (dict(hidden_cosine_weight=1.0), "layer_pairs"),
])
def test_loss_config_names_the_bad_key(bad, key):
    with pytest.raises(ValueError, match=key):
        LossConfig(**bad)


def test_user_errors_are_value_errors():
    case = make_case(seed=16)
    args = (case["hidden"], case["weight"], case["labels"])
    with pytest.raises(ValueError, match="SampledTargets"):
        distill_loss(*args, case["targets"]["tail"], 10, kl_mode="sampled")
    with pytest.raises(ValueError, match="TopkTargets"):
        distill_loss(*args, case["targets"]["sampled"], 10, kl_mode="tail")
    with pytest.raises(ValueError, match="num_valid_tokens_global"):
        distill_loss(*args, case["targets"]["tail"], 0)
    with pytest.raises(ValueError, match="lse_index"):
        tail = case["targets"]["tail"]
        distill_loss(*args, TopkTargets(tail.ids_NK, tail.logits_NK, tail.lse_NT, lse_index=2), 10)
    with pytest.raises(ValueError, match="kl_weight"):
        distill_loss(*args, None, 10)
    bad_labels = case["labels"].clone()
    bad_labels[0] = V
    with pytest.raises(ValueError, match="labels"):
        distill_loss(case["hidden"], case["weight"], bad_labels, None, 10, kl_weight=0.0)


def test_no_grad_gives_the_same_loss_and_metrics_without_gradient_work():
    """Eval runs under no_grad: same values, and no gradient buffers are kept."""
    torch.manual_seed(3)
    n, d, v, k = 29, 16, 97, 5
    hidden = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(v, d, dtype=torch.float64) * 0.5).requires_grad_(True)
    labels = torch.randint(0, v, (n,))
    labels[::4] = -100
    teacher = torch.randn(n, v, dtype=torch.float64) * 3
    logits_K, ids_K = teacher.topk(k, dim=-1)
    targets = TopkTargets(ids_NK=ids_K, logits_NK=logits_K, lse_NT=torch.logsumexp(teacher, -1)[:, None], lse_index=0)
    with_grad, metrics = distill_loss(hidden, weight, labels, targets, 20, kl_mode="tail", chunk_size=7)
    with torch.no_grad():
        no_grad, metrics_ng = distill_loss(hidden, weight, labels, targets, 20, kl_mode="tail", chunk_size=7)
    assert torch.equal(with_grad.detach(), no_grad)
    for key in metrics:
        assert torch.equal(metrics[key], metrics_ng[key])
    assert not no_grad.requires_grad and no_grad.grad_fn is None

    # Gradient work is skipped: one lm_head product per chunk instead of three.
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
                self.count += 1
            return func(*args, **(kwargs or {}))

    chunks = -(-int((labels != -100).sum()) // 7)
    with CountMatmuls() as counted_grad:
        distill_loss(hidden, weight, labels, targets, 20, kl_mode="tail", chunk_size=7)
    with torch.no_grad(), CountMatmuls() as counted_eval:
        distill_loss(hidden, weight, labels, targets, 20, kl_mode="tail", chunk_size=7)
    assert counted_eval.count == chunks
    assert counted_grad.count == 3 * chunks, (counted_grad.count, chunks)
