"""`vpmoe train` end to end on one CPU process: what a step changes, overfitting,
resume equality, bad caches, the HF export, and the guards."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from student_train.checkpoint import COMPLETE, Checkpointer, latest_checkpoint, load_projections, resolve_resume
from student_train.loader import CacheLoader, LoaderConfig
from student_train.parallel import DistEnv
from student_train.trainer import NonFiniteError, Trainer
from train_fixtures import make_rows, save_tiny_student, tiny_config, tiny_teacher, write_cache

PHASE1 = ["student.train=['\\.self_attn\\.', '\\.mlp\\.router\\.']",
          "student.freeze=['\\.experts\\.', 'embed_tokens', 'lm_head', 'norm']"]
SMALL = ["data.seq_len=16", "data.micro_batch=4", "data.global_batch=8", "student.experts_implementation=eager",
         "export.enabled=false"]
TIMING = ("tokens_per_s", "tokens_per_s_per_device", "elapsed_s", "peak_mem_gib", "mfu")


@pytest.fixture(scope="module")
def caches(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("caches")
    teacher = tiny_teacher()  # 3 layers, width 48; the student is 64 wide, so a projection is learned
    ns = SimpleNamespace(tmp=tmp)
    ns.train = tmp / "train"
    write_cache(ns.train, make_rows(24, 10, 16, seed=0), teacher, hidden_layers=(2,))
    ns.eval = tmp / "eval"
    write_cache(ns.eval, make_rows(8, 10, 16, seed=1), teacher, hidden_layers=(2,))
    ns.small = tmp / "small"
    write_cache(ns.small, make_rows(8, 12, 16, seed=2), teacher)
    ns.sampled = tmp / "sampled"
    write_cache(ns.sampled, make_rows(8, 10, 16, seed=3), teacher, mode="sampled", num_samples=32)
    ns.wide_vocab = tmp / "wide_vocab"
    write_cache(ns.wide_vocab, make_rows(8, 10, 16, seed=4), teacher, vocab=320)
    ns.student = save_tiny_student(tmp / "student")
    return ns


def trainer_for(tmp: Path, caches, *sets, train_cache=None, eval_cache=None, resume=None) -> Trainer:
    cfg = tiny_config(tmp, caches.student, train_cache or caches.train, eval_cache, *SMALL, *sets)
    return Trainer(cfg, resume)


def train(tmp: Path, caches, *sets, **kwargs) -> Trainer:
    trainer = trainer_for(tmp, caches, *sets, **kwargs)
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


def records(trainer: Trainer, kind: str = "train") -> list[dict]:
    lines = trainer.cfg.jsonl_path.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def dcp_model_state(trainer: Trainer, checkpoint: Path) -> dict:
    import torch.distributed.checkpoint as dcp

    # A checkpoint holds the trained state; frozen weights are rebuilt at start (frozen_state).
    frozen = {n for n, p in trainer.model.named_parameters() if not p.requires_grad}
    state = {k: torch.full_like(v, float("nan")) for k, v in trainer.model.state_dict().items() if k not in frozen}
    dcp.load({"model": state}, checkpoint_id=str(checkpoint), no_dist=True)
    return state


# ---------------------------------------------------------------- one step


@pytest.fixture(scope="module")
def one_step(caches, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one_step")
    trainer = trainer_for(tmp, caches, *PHASE1, "optim.steps=1", "checkpoint.every=1", "export.enabled=true")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    try:
        trainer.train()
    finally:
        trainer.close()
    return SimpleNamespace(trainer=trainer, before=before, trained=trained, tmp=tmp)


def test_one_step_changes_every_trained_weight_and_no_frozen_one(one_step):
    t = one_step.trainer
    names = dict(t.model.named_parameters())
    assert "projections.s1_t2.weight" in one_step.trained  # learned 64 -> 48 projection
    assert any(".experts." in n for n in names) and not any(".experts." in n for n in one_step.trained)
    assert any("self_attn.sinks" in n for n in one_step.trained)
    assert any("mlp.router" in n for n in one_step.trained)
    checkpoint = Path(t.cfg.checkpoint.dir) / "step-00000001"
    saved = dcp_model_state(t, checkpoint)
    stored = set(dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)  # a file this test wrote
    assert {f"model.{n}" for n in one_step.trained} <= stored
    for name, p in names.items():
        before = one_step.before[name]
        if name in one_step.trained:
            assert not torch.equal(p.detach(), before), f"trained {name} did not change"
        else:
            assert torch.equal(p.detach(), before), f"frozen {name} changed"
            assert f"model.{name}" not in stored, f"frozen {name} was written to the checkpoint"
            continue
        assert torch.equal(saved[name], p.detach()), f"checkpoint differs from memory at {name}"


def test_hf_export_loads_with_from_pretrained_and_gives_the_same_logits(one_step):
    from transformers import AutoModelForCausalLM

    t = one_step.trainer
    export = t.cfg.export_dir
    loaded = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = t.model.student.eval()(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    projections = load_projections(export)
    assert torch.equal(projections["s1_t2.weight"], t.model.projections["s1_t2"].weight.detach())
    assert not any(p.name.startswith(".tmp-") for p in export.parent.iterdir())


# ---------------------------------------------------------------- overfitting


def overfit_sets(steps: int, *loss):
    return ["student.train=[]", "student.freeze=[]", f"optim.steps={steps}", "optim.lr=1e-2", "optim.min_lr=1e-2",
            "optim.warmup_ratio=0", "optim.weight_decay=0", "data.micro_batch=8", "checkpoint.every=0",
            "loss.hidden_cosine=0", *loss]


def test_overfits_a_tiny_set_with_ce_only(caches, tmp_path):
    t = train(tmp_path, caches, *overfit_sets(60, "loss.ce=1.0", "loss.kl=0.0"), train_cache=caches.small)
    log = records(t)
    # Rows differ from their first token on, so every next token is determined: the floor is 0.
    assert log[0]["ce"] > 4.0 and log[-1]["ce"] < 0.05


def ce_kl_floor(cache: Path, w_ce: float, w_kl: float) -> float:
    """Smallest w_ce*CE + w_kl*KL(T=1, K ids + tail) any logits reach, per position, averaged.

    Over the buckets (kept ids, tail), the optimum is Q = (w_kl p + w_ce e_label) / (w_ce + w_kl),
    with all of the student's tail mass on the label when the label is in the tail.
    """
    loader = CacheLoader(LoaderConfig(str(cache), micro_batch=8, seq_len=16, shuffle=False, pin_memory=False))
    try:
        batch = next(iter(loader.epoch_batches()))
    finally:
        loader.close()
    total, count = 0.0, 0
    for b in range(batch.batch_size):
        for t in range(batch.seq_len - 1):
            y = int(batch.labels_BL[b, t + 1])
            if y == -100:
                continue
            p = np.exp(batch.targets.logits_BPK[b, t].double().numpy() - float(batch.targets.lse_BPT[b, t, 0]))
            p = np.append(p, max(1 - p.sum(), 0.0))
            hit = np.flatnonzero(batch.targets.ids_BPK[b, t].numpy() == y)
            bucket = int(hit[0]) if len(hit) else len(p) - 1
            e = np.zeros_like(p)
            e[bucket] = 1.0
            q = (w_kl * p + w_ce * e) / (w_ce + w_kl)
            nz = p > 0
            total += -w_ce * np.log(q[bucket]) + w_kl * np.sum(p[nz] * np.log(p[nz] / q[nz]))
            count += 1
    return total / count


def test_overfits_a_tiny_set_with_ce_and_kl(caches, tmp_path):
    t = train(tmp_path, caches, *overfit_sets(80, "loss.ce=0.5", "loss.kl=0.5", "loss.kl_temperature=1.0"),
              train_cache=caches.small)
    log = records(t)
    floor = ce_kl_floor(caches.small, 0.5, 0.5)
    first, last = log[0]["loss"], log[-1]["loss"]
    assert first - floor > 1.0
    assert last - floor < 0.03 * (first - floor), (first, last, floor)


# ---------------------------------------------------------------- resume


def test_resume_equals_the_straight_run_bitwise(caches, tmp_path):
    """4 straight steps == 2 steps, a fresh trainer restored from the step-2 checkpoint, 2 more steps
    (the resumed run decodes in a worker process: the batches must not depend on where they are decoded)."""
    sets = [*PHASE1, "optim.steps=4", "checkpoint.every=2"]  # 24 rows: 3 steps an epoch, so resume is mid-epoch
    straight = train(tmp_path / "a", caches, *sets)
    resumed_dir = tmp_path / "b" / "run"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(Path(straight.cfg.checkpoint.dir) / "step-00000002", resumed_dir / "checkpoints" / "step-00000002")
    shutil.copy(straight.cfg.jsonl_path, resumed_dir / "log.jsonl")  # holds steps 3-4 too: they are dropped
    resumed = train(tmp_path / "b", caches, *sets, "data.decode_processes=1", resume="")
    assert resumed.step == 4 and resumed.train_loader._processes is not None
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    state_a, state_b = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    for i, s in state_a["state"].items():
        for key, value in s.items():
            assert torch.equal(value, state_b["state"][i][key]), (i, key)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert [r["step"] for r in records(resumed)] == [1, 2, 3, 4]
    assert strip(records(straight)) == strip(records(resumed))
    assert straight.train_loader.state_dict() == resumed.train_loader.state_dict()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("case,sets,cache_attr,message", [
    ("vocab", [], "wide_vocab", "cache's vocabulary has 320 ids, the student's has 300"),
    ("layer", ["loss.layer_pairs=[[1, 3]]"], "train", r"teacher hidden layer\(s\) \[3\] not in the cache"),
    ("sampled-on-topk", ["loss.kl_mode=sampled", "loss.kl_temperature=1.0"], "train",
     "kl_mode 'sampled' needs a sampled cache"),
    ("tail-on-sampled", ["loss.hidden_cosine=0"], "sampled", "kl_mode 'tail' needs a top-k cache"),
    ("temperature", ["loss.kl_temperature=3.0"], "train", "kl_temperature 3.0 is not among the cached"),
    ("regex", ["student.train=['\\.attn_gate\\.']"], "train", r"student.train: regex .*attn_gate.* matches no"),
    ("student", ["student.path=/nonexistent/student"], "train", "student.path /nonexistent/student: does not exist"),
])
def test_bad_input_errors_before_training(caches, tmp_path, case, sets, cache_attr, message):
    with pytest.raises(ValueError, match=message) as err:
        trainer_for(tmp_path, caches, *sets, train_cache=getattr(caches, cache_attr))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing written


def test_sampled_cache_trains_with_sampled_kl(caches, tmp_path):
    t = train(tmp_path, caches, *overfit_sets(15, "loss.ce=0.0", "loss.kl=1.0", "loss.kl_mode=sampled",
                                              "loss.kl_temperature=1.0"), train_cache=caches.sampled)
    log = records(t)
    assert log[-1]["kl"] < 0.7 * log[0]["kl"]


# ---------------------------------------------------------------- guards


def test_non_finite_loss_stops_before_the_update_and_keeps_the_last_checkpoint(caches, tmp_path):
    trainer = trainer_for(tmp_path, caches, *PHASE1, "optim.steps=4", "checkpoint.every=2")
    layer = trainer.model.student.model.layers[0]
    layer.register_forward_hook(lambda m, i, out: out * float("nan") if trainer.step >= 2 else out)
    ckpt_dir = Path(trainer.cfg.checkpoint.dir)
    try:
        with pytest.raises(NonFiniteError, match=r"step 3: non-finite loss .*last checkpoint: .*step-00000002"):
            trainer.train()
        snapshot = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    finally:
        trainer.close()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step-00000002"]
    assert latest_checkpoint(ckpt_dir) == ckpt_dir / "step-00000002"
    assert all(torch.isfinite(p).all() for p in snapshot.values())  # the bad step was not applied
    saved = dcp_model_state(trainer, ckpt_dir / "step-00000002")
    assert all(torch.equal(saved[n], snapshot[n]) for n in saved)  # memory still equals the last checkpoint


def test_a_crash_mid_save_leaves_the_previous_checkpoint_usable(caches, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    real_save = dcp.save
    calls = []

    def crashing_save(state, checkpoint_id, **kwargs):
        calls.append(checkpoint_id)
        if len(calls) == 2:
            (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half")
            raise OSError("disk full")
        return real_save(state, checkpoint_id=checkpoint_id, **kwargs)

    monkeypatch.setattr(dcp, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        train(tmp_path, caches, "optim.steps=2", "checkpoint.every=1")
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert (ckpt_dir / ".tmp-step-00000002").is_dir()
    assert latest_checkpoint(ckpt_dir) == ckpt_dir / "step-00000001"
    monkeypatch.setattr(dcp, "save", real_save)
    resumed = trainer_for(tmp_path, caches, "optim.steps=2", "checkpoint.every=1", resume="")
    resumed.close()
    assert resumed.step == 1 and not (ckpt_dir / ".tmp-step-00000002").exists()


def test_a_second_run_on_a_run_directory_in_use_is_refused_and_a_dead_runs_lock_taken_over(caches, tmp_path, capsys):
    first = trainer_for(tmp_path, caches, "optim.steps=1")
    try:
        with pytest.raises(ValueError, match=rf"run is in use by another training run \(pid {os.getpid()} on host "):
            trainer_for(tmp_path, caches, "optim.steps=1")
    finally:
        first.close()
    run = tmp_path / "run"
    assert not (run / "train.lock").exists()  # released by close()

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (run / "train.lock").write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(),
                                                "started": "2026-01-01T00:00:00+00:00", "process_start": None}))
    t = train(tmp_path, caches, "optim.steps=1", "checkpoint.every=1")
    assert f"taking over the lock of a run that is gone (pid {gone.pid} on host" in capsys.readouterr().out
    assert t.step == 1 and not (run / "train.lock").exists()


def test_keep_last_k_and_resume_paths(tmp_path):
    ckpt = tmp_path / "ckpt"
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    Checkpointer(ckpt, keep=2, env=env)
    for step in (1, 2, 3):
        d = ckpt / f"step-{step:08d}"
        d.mkdir()
        (d / COMPLETE).write_text("x")
    (ckpt / "step-00000004").mkdir()  # no COMPLETE marker: never picked
    assert latest_checkpoint(ckpt) == ckpt / "step-00000003"
    assert resolve_resume(ckpt, None) is None and resolve_resume(ckpt, "") == ckpt / "step-00000003"
    with pytest.raises(ValueError, match="incomplete"):
        resolve_resume(ckpt, str(ckpt / "step-00000004"))
    with pytest.raises(ValueError, match="no such checkpoint"):
        resolve_resume(ckpt, str(tmp_path / "nope"))
    assert resolve_resume(tmp_path / "empty", "") is None  # --resume with nothing saved yet: a fresh start


def test_eval_logs_token_averaged_metrics(caches, tmp_path):
    t = train(tmp_path, caches, "optim.steps=2", "eval.every=2", "eval.samples=8", "checkpoint.every=0",
              eval_cache=caches.eval)
    evals = records(t, "eval")
    assert [r["step"] for r in evals] == [0, 2]
    for r in evals:
        assert r["tokens"] > 0 and 0 <= r["top1"] <= 1 and r["kl"] > 0 and -1 <= r["hidden_cos"] <= 1
        assert r["loss"] == pytest.approx(0.2 * r["ce"] + 0.2 * 4 * r["kl"] + 0.6 * (1 - r["hidden_cos"]))
    summary = records(t, "summary")[-1]
    assert summary["tokens"] > 0 and summary["cost_per_mtok"] is None


def test_early_stop_after_the_eval_loss_rises_patience_times_in_a_row(caches, tmp_path, monkeypatch):
    import student_train.trainer as trainer_mod

    losses = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9])
    monkeypatch.setattr(trainer_mod, "evaluate", lambda *a: {"loss": next(losses), "ce": 0.0, "kl": 0.0, "top1": 0.0,
                                                             "tokens": 1})
    trainer = trainer_for(tmp_path, caches, "optim.steps=6", "eval.every=1", "eval.early_stop_patience=2",
                          "checkpoint.every=0", eval_cache=caches.eval)
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    assert summary.stopped_early and summary.steps == 3  # evals at steps 0..3: 3.0, 2.0, 2.5 (up), 2.6 (up)
    assert [r["loss"] for r in records(trainer, "eval")] == [3.0, 2.0, 2.5, 2.6]
    assert latest_checkpoint(Path(trainer.cfg.checkpoint.dir)).name == "step-00000003"


# ---------------------------------------------------------------- packing


def test_packed_training_resumes_bitwise_and_evaluates_as_unpacked(caches, tmp_path):
    """Rows of 10-16 tokens packed into 32-token batch rows: a resumed packed run equals the
    straight one bitwise, and the step-0 eval of the same rows packed equals it unpacked."""
    packed = ["data.pack=true", "data.seq_len=32", "data.micro_batch=2", "data.global_batch=4"]
    sets = [*PHASE1, *packed, "optim.steps=4", "checkpoint.every=2", "eval.every=2"]
    straight = train(tmp_path / "a", caches, *sets, eval_cache=caches.eval)
    assert straight.train_loader._bins_GR.shape[1] >= 2  # rows really share batch rows
    resumed_dir = tmp_path / "b" / "run"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(Path(straight.cfg.checkpoint.dir) / "step-00000002", resumed_dir / "checkpoints" / "step-00000002")
    resumed = train(tmp_path / "b", caches, *sets, eval_cache=caches.eval, resume="")
    assert [n for n, _ in straight.model.named_parameters()] == [n for n, _ in resumed.model.named_parameters()]
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert strip(records(straight))[2:] == strip(records(resumed))
    unpacked = train(tmp_path / "c", caches, *PHASE1, "optim.steps=1", "eval.every=1", eval_cache=caches.eval)
    first_eval = lambda t: {k: v for k, v in records(t, "eval")[0].items() if k not in TIMING}  # noqa: E731
    assert records(straight, "eval")[0]["step"] == records(unpacked, "eval")[0]["step"] == 0
    for key, value in first_eval(unpacked).items():
        expected = pytest.approx(value, rel=1e-5) if isinstance(value, float) else value
        assert first_eval(straight)[key] == expected, key
