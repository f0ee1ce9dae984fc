"""Eval by source and by channel: the loss's per-group sums come from the same per-position
values as its totals, so every source (and every channel) adds back to the overall eval;
each group's sums are those of its positions alone."""

from __future__ import annotations

import pytest
import torch
from train_fixtures import random_loss_case

from common.causal_lm import IGNORE_INDEX
from student_train.eval_groups import breakdown
from student_train.losses import LossConfig, distill_loss
from student_train.metrics import _scalars, format_record

N, V, D, K, G = 53, 200, 12, 6, 5


def case(seed=0):
    hidden_ND, weight_VD, labels_N, targets, gen = random_loss_case(N, V, D, K, (1.0,), 0, seed)
    groups_N = torch.randint(0, G, (N,), generator=gen)
    groups_N[labels_N == IGNORE_INDEX] = -1  # as at pads: kept out by their labels
    return hidden_ND, weight_VD, labels_N, targets, groups_N


def test_group_sums_add_back_to_the_totals_and_equal_each_group_alone():
    hidden_ND, weight_VD, labels_N, targets, groups_N = case()
    with torch.no_grad():
        _, m = distill_loss(hidden_ND, weight_VD, labels_N, targets, 1.0, groups_N=groups_N, num_groups=G,
                            chunk_size=7)
    sums_G4 = m["group_sums_G4"]
    assert sums_G4.shape == (G, 4)
    assert sums_G4[:, 3].sum().item() == m["valid_tokens"].item() == (labels_N != IGNORE_INDEX).sum().item()
    for column, total in enumerate((m["ce_sum"], m["kl_sum"], m["top1_agree_sum"])):
        assert sums_G4[:, column].sum().item() == pytest.approx(total.item(), rel=1e-12)
    for g in range(G):
        alone = labels_N.masked_fill(groups_N != g, IGNORE_INDEX)
        with torch.no_grad():
            _, mg = distill_loss(hidden_ND, weight_VD, alone, targets, 1.0, chunk_size=7)
        torch.testing.assert_close(sums_G4[g], torch.stack([mg["ce_sum"], mg["kl_sum"], mg["top1_agree_sum"],
                                                            mg["valid_tokens"]]), rtol=1e-12, atol=0)


def test_breakdown_by_source_and_channel_adds_back():
    gen = torch.Generator().manual_seed(1)
    sums_G4 = torch.rand(3 * 4, 4, generator=gen, dtype=torch.float64)
    sums_G4[:, 3] = torch.randint(1, 9, (12,), generator=gen).double()
    sums_G4[5] = 0  # source 1, channel 1: no tokens
    sums_G4[8:12] = 0  # source 2: no tokens at all, so it is left out
    loss_cfg = LossConfig(ce_weight=0.3, kl_weight=0.7, kl_temperature=2.0)
    out = breakdown(sums_G4, ["a", "b", "c"], True, loss_cfg)
    assert set(out["by_source"]) == {"a", "b"}
    for group in ("by_source", "by_channel"):
        parts = out[group].values()
        assert sum(p["tokens"] for p in parts) == int(sums_G4[:, 3].sum())
        assert sum(p["ce_sum"] for p in parts) == pytest.approx(sums_G4[:, 0].sum().item(), rel=1e-12)
        for p in parts:
            # the objective's weights, KL scaled by T**2
            assert p["ce"] == pytest.approx(p["ce_sum"] / p["tokens"])
            assert p["loss"] == pytest.approx(0.3 * p["ce"] + 0.7 * 4.0 * p["kl"])
    assert out["by_source"]["b"]["tokens"] == int(sums_G4[4:8, 3].sum())
    assert out["by_channel"]["analysis"]["tokens"] == int(sums_G4[[1, 9], 3].sum())
    only_sources = breakdown(sums_G4[:3], ["a", "b", "c"], False, loss_cfg)
    assert set(only_sources) == {"by_source"}


def test_console_line_and_tensorboard_tags_carry_the_breakdown():
    record = {"kind": "eval", "step": 3, "loss": 1.0, "ce": 1.0, "kl": 0.5, "top1": 0.25,
              "by_source": {"SYNTH": {"ce": 2.0, "kl": 0.1, "top1": 0.5, "tokens": 7}},
              "by_channel": {"final": {"ce": 3.0, "kl": 0.2, "top1": 0.75, "tokens": 4}}}
    line = format_record(record)
    assert "SYNTH ce 2.0000 kl 0.1000 top1 0.500" in line and "final ce 3.0000" in line
    tags = dict(_scalars({k: v for k, v in record.items() if k != "step"}, "eval"))
    assert tags["eval/by_source/SYNTH/ce"] == 2.0 and tags["eval/by_channel/final/tokens"] == 4

