"""`loss.channel_weights`: CE and KL weighted per position by the channel of the token it
predicts, against a float64 reference on full logits; the global weighted count keeps
micro batches adding up exactly; all 1 is the unweighted loss bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from train_fixtures import random_loss_case

from common.causal_lm import IGNORE_INDEX
from common.row_columns import ANALYSIS, FINAL, PROMPT, UNKNOWN
from student_train.batch import StudentBatch
from student_train.config import LossSection
from student_train.losses import (
    ChannelWeights,
    LossConfig,
    distill_loss,
    position_weights_BP,
    weighted_valid_tokens,
)

N, V, D, K = 41, 300, 16, 8
TEMPERATURES = (1.0, 2.0)


def case(seed: int = 0):
    hidden_ND, weight_VD, labels_N, targets, gen = random_loss_case(N, V, D, K, TEMPERATURES, 1, seed)  # KL at T=2
    channels_N = torch.randint(0, 4, (N,), generator=gen)
    return hidden_ND, weight_VD, labels_N, targets, channels_N


def tail_kl_reference(student_logits_RV, targets, temperature):
    """KL over the teacher's top-k ids plus one tail bucket, from full float64 softmaxes."""
    log_q_RV = F.log_softmax(student_logits_RV / temperature, -1)
    p_RK = torch.exp(targets.logits_NK / temperature - targets.lse_NT[:, targets.lse_index:targets.lse_index + 1])
    q_RK = log_q_RV.gather(1, targets.ids_NK).exp()
    p_tail, q_tail = 1 - p_RK.sum(1), 1 - q_RK.sum(1)
    return (p_RK * (p_RK.log() - q_RK.log())).sum(1) + p_tail * (p_tail.log() - q_tail.log())


def reference(hidden_ND, weight_VD, labels_N, targets, weights_N, normaliser, ce_weight, kl_weight, temperature):
    h = hidden_ND.detach().clone().requires_grad_(True)
    w = weight_VD.detach().clone().requires_grad_(True)
    keep = labels_N != IGNORE_INDEX
    logits_RV = (h @ w.T)[keep]
    ce_R = F.cross_entropy(logits_RV, labels_N[keep], reduction="none")
    kl_R = tail_kl_reference(logits_RV, targets.rows(keep), temperature)
    weights_R = weights_N[keep]
    loss = (ce_weight * (weights_R * ce_R).sum() + kl_weight * temperature**2 * (weights_R * kl_R).sum()) / normaliser
    loss.backward()
    return loss.detach(), h.grad, w.grad, ce_R.sum().item(), kl_R.sum().item()


def run(hidden_ND, weight_VD, labels_N, targets, normaliser, weights_N=None, chunk_size=7, **kwargs):
    h = hidden_ND.detach().clone().requires_grad_(True)
    w = weight_VD.detach().clone().requires_grad_(True)
    loss, metrics = distill_loss(h, w, labels_N, targets, normaliser, weights_N=weights_N, chunk_size=chunk_size,
                                 **kwargs)
    loss.backward()
    return loss.detach(), h.grad, w.grad, metrics


WEIGHTS = ChannelWeights(prompt=0.0, analysis=0.25, final=1.5, unknown=1.0)


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_weighted_loss_and_gradients_match_float64_reference(chunk_size):
    hidden_ND, weight_VD, labels_N, targets, channels_N = case()
    weights_N = torch.tensor(WEIGHTS.table_C(), dtype=torch.float64)[channels_N]
    keep = labels_N != IGNORE_INDEX
    normaliser = float(weights_N[keep].sum()) * 1.7  # a global count larger than this call's share
    kwargs = dict(ce_weight=0.6, kl_weight=1.4, kl_temperature=2.0, kl_mode="tail")
    loss, g_hidden, g_weight, metrics = run(hidden_ND, weight_VD, labels_N, targets, normaliser, weights_N,
                                            chunk_size=chunk_size, **kwargs)
    ref_loss, ref_hidden, ref_weight, ce_sum, kl_sum = reference(hidden_ND, weight_VD, labels_N, targets, weights_N,
                                                                 normaliser, 0.6, 1.4, 2.0)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(g_hidden, ref_hidden, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(g_weight, ref_weight, rtol=1e-9, atol=1e-13)
    # positions of weight 0 get no gradient; the metric sums stay unweighted (what eval reports)
    zero_rows = (weights_N == 0) & keep
    assert zero_rows.any() and (g_hidden[zero_rows] == 0).all()
    assert metrics["ce_sum"].item() == pytest.approx(ce_sum, rel=1e-10)
    assert metrics["kl_sum"].item() == pytest.approx(kl_sum, rel=1e-10)
    assert metrics["valid_tokens"].item() == keep.sum().item()


def test_unit_weights_are_the_unweighted_loss_bit_for_bit():
    hidden_ND, weight_VD, labels_N, targets, _ = case(1)
    count = float((labels_N != IGNORE_INDEX).sum())
    plain = run(hidden_ND, weight_VD, labels_N, targets, count)
    ones = run(hidden_ND, weight_VD, labels_N, targets, count, torch.ones(N, dtype=torch.float64))
    for a, b in zip(plain[:3], ones[:3]):
        assert torch.equal(a, b)


def test_micro_batches_with_the_global_weighted_count_add_up_to_one_call():
    hidden_ND, weight_VD, labels_N, targets, channels_N = case(2)
    weights_N = torch.tensor(WEIGHTS.table_C(), dtype=torch.float64)[channels_N]
    total = float(weights_N[labels_N != IGNORE_INDEX].sum())
    whole = run(hidden_ND, weight_VD, labels_N, targets, total, weights_N)
    parts = [run(hidden_ND[rows], weight_VD, labels_N[rows], targets.rows(rows), total, weights_N[rows])
             for rows in (slice(0, 15), slice(15, N))]
    assert (parts[0][0] + parts[1][0]).item() == pytest.approx(whole[0].item(), rel=1e-12)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), whole[1], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(parts[0][2] + parts[1][2], whole[2], rtol=1e-10, atol=1e-15)


def batch_with_channels(channels_BL, labels_BL) -> StudentBatch:
    b, length = channels_BL.shape
    return StudentBatch(row_ids_BR=torch.zeros(b, 1, dtype=torch.int64),
                        input_ids_BL=torch.zeros(b, length, dtype=torch.int64),
                        attention_mask_BL=(channels_BL >= 0).long(), labels_BL=labels_BL, channels_BL=channels_BL)


def test_a_position_takes_the_weight_of_the_token_it_predicts():
    channels_BL = torch.tensor([[PROMPT, PROMPT, ANALYSIS, ANALYSIS, FINAL, -1],
                                [PROMPT, ANALYSIS, FINAL, FINAL, UNKNOWN, FINAL]])
    labels_BL = torch.tensor([[-100, -100, 5, 6, 7, -100], [-100, 1, 2, 3, 4, 5]])
    batch = batch_with_channels(channels_BL, labels_BL)
    weights_BP = position_weights_BP(batch, WEIGHTS)
    assert weights_BP.tolist() == [[0.0, 0.25, 0.25, 1.5, 0.0], [0.25, 1.5, 1.5, 1.0, 1.5]]
    # the normaliser counts valid positions (labels of token t + 1) with their weights
    assert weighted_valid_tokens(batch, WEIGHTS).item() == pytest.approx(0.25 + 0.25 + 1.5 + 0.25 + 1.5 + 1.5 + 1.0 + 1.5)
    assert weighted_valid_tokens(batch, ChannelWeights()).item() == 8
    assert position_weights_BP(batch, ChannelWeights()) is None


def test_weights_need_a_cache_with_channels():
    batch = batch_with_channels(torch.zeros(1, 4, dtype=torch.int64), torch.ones(1, 4, dtype=torch.int64))
    batch.channels_BL = None
    with pytest.raises(ValueError, match="channel_weights needs a cache that stores channels"):
        position_weights_BP(batch, WEIGHTS)


def test_channel_weights_from_the_config():
    cfg = LossSection(channel_weights=ChannelWeights(analysis=0.5)).to_loss_config()
    assert cfg.channel_weights.table_C() == (1.0, 0.5, 1.0, 1.0)
    assert LossConfig().channel_weights.uniform
    with pytest.raises(ValueError, match="channel_weights.final must be a finite number >= 0"):
        ChannelWeights(final=-1.0)
