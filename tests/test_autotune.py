"""`vpmoe autotune`: grad-accumulation arithmetic, the search, and a CPU run."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import student_train.autotune as autotune_mod
from student_train.autotune import plan_accumulation
from train_fixtures import make_rows, save_tiny_student, tiny_config, tiny_teacher, write_cache


def test_grad_accumulation_per_target_global_batch():
    p = plan_accumulation(256, max_micro_batch=4, world_size=8)
    assert (p.micro_batch, p.grad_accum) == (4, 8) and p.micro_batch * p.grad_accum * 8 == 256
    p = plan_accumulation(512, max_micro_batch=1, world_size=8)
    assert (p.micro_batch, p.grad_accum) == (1, 64)
    # 3 fits, but 32 sequences per rank split evenly only into micro batches of 2.
    p = plan_accumulation(256, max_micro_batch=3, world_size=8)
    assert (p.micro_batch, p.grad_accum) == (2, 16) and "3 fits" in p.note
    p = plan_accumulation(8, max_micro_batch=64, world_size=8)
    assert (p.micro_batch, p.grad_accum) == (1, 1)
    assert plan_accumulation(100, 4, 8).micro_batch == 0  # 100 sequences do not split over 8 ranks
    assert plan_accumulation(256, 0, 8).micro_batch == 0
    with pytest.raises(ValueError, match="--target-gbs"):
        plan_accumulation(0, 4, 8)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("autotune")
    write_cache(tmp / "train", make_rows(8, 8, 12, seed=0), tiny_teacher(), hidden_layers=(2,))
    student = save_tiny_student(tmp / "student")
    return tmp, student


def test_cpu_autotune_probes_up_to_the_cap_and_says_so(tiny_run):
    tmp, student = tiny_run
    cfg = tiny_config(tmp, student, tmp / "train", None, "student.experts_implementation=eager")
    result = autotune_mod.run(cfg, seq_len=32, target_gbs=[8, 12], max_micro_batch=3)
    assert result.device == "cpu" and result.world_size == 1
    assert result.max_micro_batch == 3 and result.capped
    assert [p.micro_batch for p in result.probes] == [1, 2, 3]  # doubling to 2, then bisection up to the cap
    assert all(p.fits for p in result.probes)
    assert any("cap of micro batch 3" in n for n in result.notes)
    (a, b) = result.plans
    assert (a.target_gbs, a.micro_batch, a.grad_accum) == (8, 2, 4)
    assert (b.target_gbs, b.micro_batch, b.grad_accum) == (12, 3, 4)


def test_search_stops_at_the_first_size_that_runs_out_of_memory(tiny_run, monkeypatch):
    """With a fake memory limit of 5 sequences: probes 1, 2, 4, 8 (fails), then 6 (fails), 5."""
    from student_train.model import DistillModel

    tmp, student = tiny_run

    real_forward = DistillModel.forward

    def forward(self, batch, *args):
        if batch.batch_size > 5:
            raise torch.OutOfMemoryError("fake: over the limit")
        return real_forward(self, batch, *args)

    monkeypatch.setattr(DistillModel, "forward", forward)
    cfg = tiny_config(tmp, student, tmp / "train", None, "student.experts_implementation=eager")
    result = autotune_mod.run(cfg, seq_len=16, target_gbs=[64], max_micro_batch=16)
    assert [(p.micro_batch, p.fits) for p in result.probes] == [(1, True), (2, True), (4, True), (8, False),
                                                                 (6, False), (5, True)]
    assert result.max_micro_batch == 5 and not result.capped
    assert (result.plans[0].micro_batch, result.plans[0].grad_accum) == (4, 16)


def test_a_size_that_runs_but_leaves_less_than_the_headroom_does_not_fit(tiny_run, monkeypatch):
    """A GPU of 80 GiB where a micro batch of m takes 10 m GiB at its peak: with 5% headroom
    (76 GiB) 7 fits and 8 does not, though 8 runs; with none, 8 fits."""
    from student_train.model import DistillModel

    tmp, student = tiny_run
    real_forward = DistillModel.forward
    last = {}

    def forward(self, batch, *args):
        last["m"] = batch.batch_size
        return real_forward(self, batch, *args)

    monkeypatch.setattr(DistillModel, "forward", forward)
    monkeypatch.setattr(autotune_mod, "_peak_and_total", lambda device: (last["m"] * 10 * 2**30, 80 * 2**30))
    cfg = tiny_config(tmp, student, tmp / "train", None, "student.experts_implementation=eager")
    result = autotune_mod.run(cfg, seq_len=16, target_gbs=[8], max_micro_batch=16)
    assert [(p.micro_batch, p.fits, p.why) for p in result.probes] == [
        (1, True, ""), (2, True, ""), (4, True, ""), (8, False, "headroom"), (6, True, ""), (7, True, "")]
    assert result.max_micro_batch == 7 and result.probes[3].peak_mem_gib == 80
    assert any("micro batch 8 ran but left less than 5%" in note for note in result.notes)
    relaxed = autotune_mod.run(cfg, seq_len=16, target_gbs=[8], max_micro_batch=8, headroom=0.0)
    assert relaxed.max_micro_batch == 8 and relaxed.capped
    with pytest.raises(ValueError, match="--headroom must be in"):
        autotune_mod.run(cfg, seq_len=16, target_gbs=[8], headroom=1.0)


def test_autotune_command_accepts_several_target_batches(tiny_run, tmp_path):
    from cli.main import app
    from student_train.config import save_config

    tmp, student = tiny_run
    cfg = tiny_config(tmp, student, tmp / "train", None, "student.experts_implementation=eager")
    path = save_config(cfg, tmp_path / "c.yaml")
    result = CliRunner().invoke(app, ["autotune", str(path), "--seq-len", "16", "--target-gbs", "4", "8",
                                      "--max-micro-batch", "2", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    assert [p["target_gbs"] for p in out["plans"]] == [4, 8] and out["max_micro_batch"] == 2


def test_measure_recompute_times_both_settings_and_keeps_the_faster(tiny_run, monkeypatch):
    """--recompute measure: a search per setting, each timed at its largest micro batch; the result
    (micro batch, plans) is the faster setting's. A fake memory limit lets only recompute reach 4."""
    from student_train.model import DistillModel

    tmp, student = tiny_run
    real_forward = DistillModel.forward

    def forward(self, batch, *args):
        limit = 4 if self.student.is_gradient_checkpointing else 1
        if batch.batch_size > limit:
            raise torch.OutOfMemoryError("fake: over the limit")
        return real_forward(self, batch, *args)

    monkeypatch.setattr(DistillModel, "forward", forward)
    cfg = tiny_config(tmp, student, tmp / "train", None, "student.experts_implementation=eager")
    result = autotune_mod.run(cfg, seq_len=16, target_gbs=[8], max_micro_batch=4, recompute="measure")
    off, on = result.candidates
    assert (off.activation_checkpointing, off.max_micro_batch) == (False, 1)
    assert (on.activation_checkpointing, on.max_micro_batch) == (True, 4)
    assert off.tokens_per_s > 0 and on.tokens_per_s > 0
    faster = max(result.candidates, key=lambda c: c.tokens_per_s)
    assert result.activation_checkpointing == faster.activation_checkpointing
    assert result.max_micro_batch == faster.max_micro_batch
    assert result.plans[0].micro_batch == faster.max_micro_batch
    assert any("chosen: activation_checkpointing" in n for n in result.notes)
