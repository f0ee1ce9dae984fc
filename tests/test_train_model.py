"""The student wrapper, parameter selection, optimizer and FLOP count, against
independent float64 references built from the HF model's own outputs."""

from __future__ import annotations

import math

import pytest
import torch

from common.targets.topk import TopkBatchTargets
from demo.tiny_models import build_model, tiny_gpt_oss_config, tiny_llama_config
from student_train.batch import StudentBatch
from student_train.config import OptimConfig, StudentConfig
from student_train.losses import LossConfig
from student_train.metrics import flops_model
from student_train.model import DistillModel, TargetLayout, select_trainable
from student_train.optim import Schedule, build_optimizer, group_parameters, newton_schulz

V = 300
TEMPERATURES = (1.0, 2.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def gpt_oss_student(dtype=torch.float64, lm_head_scale=4.0):
    config = tiny_gpt_oss_config(V, hidden_size=32, num_layers=2)
    config._experts_implementation = "eager"
    return build_model(config, seed=3, dtype=dtype, lm_head_scale=lm_head_scale).train()


def padded_batch(gen, lengths=(9, 12), k=8, teacher_width=24, teacher_layer=2, drop_hidden_at=(0, 5)):
    """Two right-padded rows, first 3 labels masked, random teacher targets and hidden states."""
    B, L = len(lengths), max(lengths)
    input_ids = torch.zeros(B, L, dtype=torch.int64)
    mask = torch.zeros(B, L, dtype=torch.int64)
    for b, n in enumerate(lengths):
        input_ids[b, :n] = torch.randint(0, V, (n,), generator=gen)
        mask[b, :n] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    teacher_logits = 3.0 * torch.randn(B, L - 1, V, generator=gen, dtype=torch.float64)
    top = teacher_logits.topk(k, dim=-1)
    ids = top.indices.sort(dim=-1).values
    hidden_mask = mask.bool().clone()
    hidden_mask[drop_hidden_at] = False
    return StudentBatch(
        row_ids_BR=torch.arange(B)[:, None], input_ids_BL=input_ids, attention_mask_BL=mask, labels_BL=labels,
        targets=TopkBatchTargets(ids_BPK=ids, logits_BPK=teacher_logits.gather(-1, ids),
                                 lse_BPT=torch.stack([torch.logsumexp(teacher_logits / t, -1) for t in TEMPERATURES], -1)),
        teacher_hidden={teacher_layer: torch.randn(B, L, teacher_width, generator=gen, dtype=torch.float64)},
        hidden_mask_BL=hidden_mask, num_tokens=int(mask.sum()))


def reference_loss(student, proj_weight, batch, cfg: LossConfig, teacher_layer, student_layer):
    """Naive float64: full logits, explicit t -> t+1 shift, K+1-bucket KL, cosine per position."""
    out = student(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL, output_hidden_states=True)
    logits_BLV = out.logits
    T = cfg.kl_temperature
    t_index = TEMPERATURES.index(T)
    ce_sum = kl_sum = 0.0
    valid = 0
    B, L = batch.input_ids_BL.shape
    for b in range(B):
        for t in range(L - 1):
            label = int(batch.labels_BL[b, t + 1])
            if label == -100:
                continue
            valid += 1
            ce_sum = ce_sum - torch.log_softmax(logits_BLV[b, t], -1)[label]
            p_K = torch.exp(batch.targets.logits_BPK[b, t] / T - batch.targets.lse_BPT[b, t, t_index])
            q_V = torch.softmax(logits_BLV[b, t] / T, -1)
            q_K = q_V[batch.targets.ids_BPK[b, t]]
            p_tail, q_tail = 1 - p_K.sum(), 1 - q_K.sum()
            kl_sum = kl_sum + (p_K * (p_K / q_K).log()).sum() + p_tail * (p_tail / q_tail).log()
    student_BLD = out.hidden_states[student_layer]  # the stream leaving decoder block `student_layer`
    teacher_BLE = batch.teacher_hidden[teacher_layer]
    dist_sum = 0.0
    positions = 0
    for b in range(B):
        for t in range(L):
            if batch.hidden_mask_BL[b, t]:
                s = proj_weight @ student_BLD[b, t]
                dist_sum = dist_sum + 1 - torch.dot(s, teacher_BLE[b, t]) / (s.norm() * teacher_BLE[b, t].norm())
                positions += 1
    return (cfg.ce_weight * ce_sum + cfg.kl_weight * T**2 * kl_sum) / valid \
        + cfg.hidden_cosine_weight * dist_sum / positions, valid, positions


def test_loss_and_gradients_match_a_float64_reference():
    gen = torch.Generator().manual_seed(0)
    student = gpt_oss_student()
    batch = padded_batch(gen)
    cfg = LossConfig(ce_weight=0.3, kl_weight=0.5, hidden_cosine_weight=0.7, kl_temperature=2.0, kl_mode="tail",
                     chunk_size=7, layer_pairs=((1, 2),))
    model = DistillModel(student, cfg, TargetLayout(lse_index=1, num_samples=0, teacher_hidden_size=24))
    proj = model.projections["s1_t2"]
    assert proj.weight.dtype == torch.float64 and proj.weight.shape == (24, 32)

    ref, valid, positions = reference_loss(student, proj.weight, batch, cfg, teacher_layer=2, student_layer=1)
    ref.backward()
    watched = {"q_proj": student.model.layers[0].self_attn.q_proj.weight,
               "sinks": student.model.layers[1].self_attn.sinks,
               "lm_head": student.lm_head.weight, "projection": proj.weight}
    ref_grads = {k: p.grad.clone() for k, p in watched.items()}
    model.zero_grad(set_to_none=True)

    loss, sums = model(batch, float(valid), float(positions))
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    assert int(sums.valid_tokens) == valid and int(sums.hidden_positions) == positions
    for name, p in watched.items():
        assert ref_grads[name].abs().max() > 0, name
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-8, atol=1e-12, msg=name)


def test_target_t_predicts_token_t_plus_1():
    """A teacher putting all its mass on token t+1 at position t makes the KL equal the CE
    that HF computes with its own shift; any other alignment gives a different value."""
    gen = torch.Generator().manual_seed(1)
    student = gpt_oss_student(lm_head_scale=24.0)  # peaked outputs: misaligned targets score very differently
    batch = padded_batch(gen, lengths=(10, 10), k=4)
    # One position per row counts, so no average over positions can hide a misalignment.
    batch.labels_BL.fill_(-100)
    batch.labels_BL[:, 6] = batch.input_ids_BL[:, 6]
    next_BP = batch.input_ids_BL[:, 1:]
    others_BPK = (next_BP[..., None] + torch.arange(1, 4)) % V
    batch.targets.ids_BPK = torch.cat([next_BP[..., None], others_BPK], -1)
    batch.targets.logits_BPK = torch.tensor([0.0, -1e4, -1e4, -1e4], dtype=torch.float64).expand(2, 9, 4).clone()
    batch.targets.lse_BPT = torch.zeros(2, 9, 2, dtype=torch.float64)  # p(token t+1) = 1, tail 0
    cfg = LossConfig(ce_weight=0.0, kl_weight=1.0, kl_temperature=1.0)
    model = DistillModel(student, cfg, TargetLayout(0, 0, 0))
    valid = int((batch.labels_BL[:, 1:] != -100).sum())
    kl, _ = model(batch, float(valid))
    with torch.no_grad():
        hf_ce = student(input_ids=batch.input_ids_BL, labels=batch.labels_BL).loss
        logits = student(input_ids=batch.input_ids_BL).logits
    shifted = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), batch.labels_BL[:, 1:].reshape(-1))
    torch.testing.assert_close(kl.detach(), shifted, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(kl.detach(), hf_ce.double(), rtol=1e-5, atol=1e-6)  # HF computes it in float32
    # Read without the shift, the same labels score differently by far more than the tolerance above.
    unshifted = torch.nn.functional.cross_entropy(logits.reshape(-1, V), batch.labels_BL.reshape(-1))
    assert abs(float(unshifted) - float(shifted)) > 1e-2


def test_phase1_default_trains_attention_and_router_only():
    student = gpt_oss_student(torch.float32)
    defaults = StudentConfig()
    counts = select_trainable(student, defaults.train, defaults.freeze)
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    for name, p in student.named_parameters():
        should = (".self_attn." in name or ".mlp.router." in name)
        assert (name in trained) == should, name
    assert any(n.endswith("self_attn.sinks") for n in trained)
    assert counts.trained == sum(p.numel() for p in student.parameters() if p.requires_grad)
    assert counts.frozen == sum(p.numel() for p in student.parameters() if not p.requires_grad)
    assert "trained" in counts.describe() and f"{counts.trained:,}" in counts.describe()


def test_freeze_wins_over_train_and_a_regex_matching_nothing_is_an_error():
    student = gpt_oss_student(torch.float32)
    select_trainable(student, [r"\.self_attn\."], [r"q_proj"])
    assert not student.model.layers[0].self_attn.q_proj.weight.requires_grad
    assert student.model.layers[0].self_attn.k_proj.weight.requires_grad
    with pytest.raises(ValueError, match=r"student\.freeze: regex .*gate_proj.* matches no parameter"):
        select_trainable(student, [], [r"\.mlp\.gate_proj\."])
    with pytest.raises(ValueError, match="student.train: regex 'cross_attn'"):
        select_trainable(student, ["cross_attn"], [])


def test_no_weight_decay_on_norms_biases_and_1d_and_muon_on_2d_hidden_weights():
    student = gpt_oss_student(torch.float32)
    select_trainable(student, [], [])
    groups = group_parameters(student, use_muon=True)
    muon = {n for n, _ in groups.muon}
    no_decay = {n for n, _ in groups.no_decay}
    assert "model.layers.0.self_attn.q_proj.weight" in muon and "model.layers.0.mlp.router.weight" in muon
    assert "lm_head.weight" not in muon and "model.embed_tokens.weight" not in muon
    for name, p in student.named_parameters():
        if p.ndim < 2 or "norm" in name or name.endswith("bias"):
            assert name in no_decay, name
    opt = build_optimizer(student, OptimConfig(name="adamw"), torch.device("cpu"))
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(student.model.norm.weight)] == 0.0
    assert decays[id(student.model.layers[0].self_attn.q_proj.weight)] == 0.1


def test_newton_schulz_orthogonalises():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(48, 16, generator=gen) @ torch.diag(torch.logspace(-1, 0.5, 16))  # condition ~30
    ortho = newton_schulz(g, steps=5).double()
    s = torch.linalg.svdvals(ortho)
    # The quintic iteration pushes every singular value into roughly [0.7, 1.2] (it trades exactness for speed).
    assert s.min() > 0.6 and s.max() < 1.25
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    cos = (ortho * (u @ vh)).sum() / ((u @ vh).norm() * ortho.norm())
    assert cos > 0.98  # the direction of U V^T


def test_muon_step_is_the_orthogonalised_gradient():
    student = gpt_oss_student(torch.float32)
    select_trainable(student, [r"\.self_attn\."], [])
    opt = build_optimizer(student, OptimConfig(name="muon", muon_lr=0.02, weight_decay=0.0), torch.device("cpu"))
    w = student.model.layers[0].self_attn.o_proj.weight
    before = w.detach().clone()
    x = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(0))
    student(input_ids=x, labels=x).loss.backward()
    grad = w.grad.clone()
    opt.step()
    delta = (w.detach() - before) / -0.02  # square matrix: no shape scale
    # First step: momentum buffer = g, Nesterov update = (1 + mu) g; the iteration is scale-free.
    torch.testing.assert_close(delta, newton_schulz(grad, 5), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(delta, grad / grad.norm(), atol=1e-2)


def test_warmup_then_cosine_to_min_lr():
    sched = Schedule(total_steps=100, warmup_steps=10, min_ratio=0.1)
    assert sched.factor(0) == pytest.approx(0.1) and sched.factor(9) == pytest.approx(1.0)
    assert sched.factor(10) == pytest.approx(1.0)
    assert sched.factor(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert sched.factor(100) == pytest.approx(0.1)


def test_flops_count_6n_trained_4n_frozen_and_active_experts_only():
    config = tiny_gpt_oss_config(V, hidden_size=32, num_layers=2, num_experts=4, experts_per_token=2,
                                 sliding_window=8)
    student = build_model(config, seed=0)
    select_trainable(student, StudentConfig().train, StudentConfig().freeze)
    fm = flops_model(student, config, seq_len=64)
    trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
    experts = sum(p.numel() for n, p in student.named_parameters() if ".experts." in n)
    embed = student.model.embed_tokens.weight.numel()
    frozen_all = sum(p.numel() for p in student.parameters() if not p.requires_grad)
    assert fm.trained_active == trained
    assert fm.frozen_active == frozen_all - embed - experts + experts * 2 // 4
    head_dim = 32 // 4
    # layer 0 sliding (context 8), layer 1 full (context 64)
    assert fm.attention_per_token == 12 * 4 * head_dim * (8 + 64)
    assert fm.per_token == 6 * fm.trained_active + 4 * fm.frozen_active + fm.attention_per_token


def test_dense_student_flops_count_has_no_expert_scaling():
    config = tiny_llama_config(V, hidden_size=32, num_layers=2)
    student = build_model(config, seed=0)
    select_trainable(student, [], [r"embed_tokens"])
    fm = flops_model(student, config, seq_len=16)
    assert fm.trained_active == sum(p.numel() for p in student.parameters() if p.requires_grad)
    assert fm.frozen_active == 0
