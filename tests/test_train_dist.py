"""1 rank and 2 gloo ranks (FSDP2, started by `vpmoe train --nproc-per-node 2`, frozen weights
replicated or sharded) train the same global batches to the same losses and gradient norms; the
ranks die with their launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from student_train.config import save_config
from student_train.trainer import Trainer
from train_fixtures import make_rows, save_tiny_student, tiny_config, tiny_teacher, write_cache

REPO = Path(__file__).resolve().parents[1]
COMPARED = ("loss", "ce", "kl", "hidden_cos", "top1", "grad_norm", "lr", "valid_tokens")


def run_sets(micro_batch: int) -> list[str]:
    # Global batch 4 either way: 1 rank x micro 2 x accum 2, or 2 ranks x micro 1 x accum 2. The loader
    # gives both the same rows per step; only the padding inside a micro batch differs.
    return [f"data.micro_batch={micro_batch}", "data.global_batch=4", "data.seq_len=16", "optim.steps=3",
            "optim.name=muon", "optim.lr=3e-3", "optim.grad_clip=1.0", "checkpoint.every=0",
            "student.experts_implementation=eager",
            "student.train=['\\.self_attn\\.', '\\.mlp\\.router\\.']",
            "student.freeze=['\\.experts\\.', 'embed_tokens', 'lm_head', 'norm']"]


def train_log(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    teacher = tiny_teacher()
    write_cache(tmp / "train", make_rows(16, 8, 16, seed=0), teacher, hidden_layers=(2,))
    student = save_tiny_student(tmp / "student")
    return tmp, student


@pytest.mark.parametrize("frozen", ["replicate", "shard"])
def test_one_and_two_ranks_give_the_same_losses(setup, frozen):
    tmp, student = setup
    tmp = tmp / frozen
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = Trainer(tiny_config(tmp / "one", student, setup[0] / "train", None, *run_sets(2)))
        try:
            one.train()
        finally:
            one.close()
    finally:
        torch.set_num_threads(threads)

    cfg_two = tiny_config(tmp / "two", student, setup[0] / "train", None, *run_sets(1), f"frozen_weights={frozen}")
    config_path = save_config(cfg_two, tmp / "two.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "cli", "train", str(config_path), "--nproc-per-node", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2 x micro batch 1 x grad accum 2" in proc.stdout

    log_one, log_two = train_log(one.cfg.jsonl_path), train_log(cfg_two.jsonl_path)
    assert [r["step"] for r in log_two] == [1, 2, 3]
    for a, b in zip(log_one, log_two):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=2e-4, abs=1e-6), (a["step"], key, a[key], b[key])
    # The step-1 losses do not depend on the optimizer; later ones would drift apart if the 2-rank gradients
    # were averaged instead of summed (the gradient norm would halve).
    assert log_one[2]["loss"] != log_one[0]["loss"]

    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(str(one.cfg.export_dir))
    b = AutoModelForCausalLM.from_pretrained(str(cfg_two.export_dir))
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-3, atol=1e-5, msg=name)


def children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(root: int) -> list[int]:
    children, found, todo = children_by_parent(), [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie has exited


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_killing_the_launcher_ends_torchruns_agent_and_both_ranks(setup, tmp_path):
    tmp, student = setup
    cfg = tiny_config(tmp_path, student, tmp / "train", None, *run_sets(1), "optim.steps=100000")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = subprocess.Popen([sys.executable, "-m", "cli", "train", str(save_config(cfg, tmp_path / "run.yaml")),
                                 "--nproc-per-node", "2"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    started = []
    try:
        deadline = time.monotonic() + 180
        while not (cfg.jsonl_path.is_file() and cfg.jsonl_path.read_text().strip()):  # both ranks are stepping
            assert launcher.poll() is None and time.monotonic() < deadline, "the run never got to its first step"
            time.sleep(0.2)
        children = children_by_parent()
        (agent,) = children[launcher.pid]
        ranks = children.get(agent, [])
        started = [agent, *ranks]
        assert len(ranks) == 2
        # SIGKILL to the launcher alone: its agent must die with it, and the ranks with the agent (which
        # covers the whole process group too: torchrun starts the ranks in sessions of their own).
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 10
        while any(map(running, started)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(running, started)), [p for p in started if running(p)]
    finally:
        # Whatever failed: the launcher's whole tree (ranks run in sessions of their own) goes.
        tree = started or descendants(launcher.pid)
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        for pid in tree:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
