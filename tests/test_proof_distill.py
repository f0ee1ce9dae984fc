"""The distillation proof (`bench/proof_distill.py`) end to end at a very small CPU scale, so the
script the GPU run needs cannot rot: data, teacher, the caches through `vpmoe cache-teacher`, the
dense row through `vpmoe train` and full KD with the teacher online, the report, and a rerun that
skips what is done and refuses results made with other settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("sampled_n12", "dense", "full_kd")
# The cpu preset made smaller still: a 30-step teacher, students of 4 steps over 64 cached rows.
TINY = ["--preset", "cpu", "--corpus-mb", "2", "--train-rows", "1000", "--val-rows", "16", "--teacher-steps", "30",
        "--cache-rows", "64", "--steps", "4"]


def proof(*args, work: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "bench/proof_distill.py", *args, "--work", str(work), *TINY], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def proof_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("proof")
    proc = proof("run", "--variants", ",".join(VARIANTS), work=work)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return work, proc.stdout


@pytest.mark.slow
def test_every_variant_has_a_result_with_its_metrics(proof_run):
    work, stdout = proof_run
    setup = json.loads((work / "results" / "setup.json").read_text())
    assert setup["data"]["facts"]["train_tokens"] == 1000 * 128
    assert len(setup["teacher"]["facts"]["teacher_sha256"]) == 64
    for name in VARIANTS:
        result = json.loads((work / "results" / "runs" / f"{name}.seed0.json").read_text())
        assert result["settings"]["variant"] == name and result["settings"]["seed"] == 0
        assert 0 < result["heldout_ce"] < 10 and 0 <= result["ece"] <= 1 and 0 <= result["top1_agree"] <= 1
        assert result["train_tokens"] == 4 * 16 * 128 and result["train_tokens_per_s"] > 0
        assert f"| {name} |" in stdout
    caches = json.loads((work / "results" / "caches.json").read_text())
    assert set(caches) == {"sampled12", "dense"}  # only the caches the variants read
    assert "| full_kd | teacher online | 1 |" in stdout
    # the report's gap to full KD is each variant's held-out CE minus full KD's, from the results
    kd_ce = json.loads((work / "results" / "runs" / "full_kd.seed0.json").read_text())["heldout_ce"]
    for name in ("sampled_n12", "dense"):
        ce = json.loads((work / "results" / "runs" / f"{name}.seed0.json").read_text())["heldout_ce"]
        line = next(x for x in stdout.splitlines() if x.startswith(f"| {name} |"))
        assert line.rstrip().endswith(f"| {ce - kd_ce:+.4f} |"), line


@pytest.mark.slow
def test_full_kd_differs_from_the_dense_cache_only_in_the_teachers_state(proof_run):
    """Same init, data order and steps: the first logged loss of the two runs nearly agree (the
    dense cache holds the teacher's state in fp8, the online teacher gives it exactly)."""
    work, _ = proof_run

    def train_losses(run):
        lines = (work / "runs" / run / "log.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if json.loads(x).get("kind") == "train"]

    dense, online = train_losses("dense.seed0"), train_losses("full_kd.seed0")
    assert len(dense) == len(online) and dense != online
    assert dense == pytest.approx(online, rel=0.02)


@pytest.mark.slow
def test_a_rerun_skips_what_is_done_and_refuses_other_settings(proof_run):
    work, _ = proof_run
    again = proof("students", "--variants", ",".join(VARIANTS), work=work)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done already (same settings, same teacher)") == len(VARIANTS)
    assert "$ vpmoe train" not in again.stdout

    other = proof("students", "--variants", "dense", "--lr", "1e-3", work=work)
    assert other.returncode == 2
    assert "dense.seed0.json: made with other settings (scale.lr: 0.003 -> 0.001)" in other.stderr


@pytest.mark.slow
def test_shards_split_the_pending_runs_between_processes(proof_run):
    """`--shard I/N` (one process per GPU) runs every N-th run of the order from the I-th, so two
    shards together do each pending run once."""
    work, _ = proof_run
    runs = work / "results" / "runs"
    for name in ("sampled_n12", "dense"):
        (runs / f"{name}.seed0.json").rename(work / f"{name}.kept.json")
    # order: (seed 0) sampled_n12, dense, full_kd -> shard 1/2 holds dense only
    second = proof("students", "--variants", ",".join(VARIANTS), "--shard", "1/2", work=work)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("$ vpmoe train") == 1 and (runs / "dense.seed0.json").exists()
    assert not (runs / "sampled_n12.seed0.json").exists()
    first = proof("students", "--variants", ",".join(VARIANTS), "--shard", "0/2", work=work)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "full_kd.seed0: done already" in first.stdout and (runs / "sampled_n12.seed0.json").exists()
    bad = proof("students", "--shard", "2/2", work=work)
    assert bad.returncode == 2 and "--shard: I must be in 0..N-1" in bad.stderr
