"""The README's first command, at the reduced CI size: the whole pipeline on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_quickstart(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "cli", "quickstart", str(out), "--size", "ci"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_a_rerun_resumes(tmp_path):
    out = tmp_path / "qs"
    first = run_quickstart(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())

    # The cache holds every train row, and inspect-shard verified it.
    manifest = json.loads((out / "cache" / "train" / "manifest.json").read_text())
    assert manifest["totals"]["rows"] == summary["data"]["train_rows"] > 0
    assert manifest["totals"]["tokens"] == summary["data"]["train_tokens"]
    assert summary["inspect"]["verify"]["ok"] is True

    # The teacher learned something, and the student moved towards it.
    assert summary["teacher"]["final_loss"] < summary["teacher"]["first_loss"]
    before, after = summary["train"]["eval_first"], summary["train"]["eval_last"]
    assert before["step"] == 0 and after["step"] > 0
    assert after["ce"] < before["ce"]
    assert after["kl"] < before["kl"]

    # The export loads with from_pretrained and runs.
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(out / "run" / "export"))
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape[-1] == summary["data"]["vocab_size"] and torch.isfinite(logits).all()

    # A rerun resumes: every stage is skipped and nothing is recomputed.
    shard_bytes = (out / "cache" / "train" / "shard-00000.arrow").read_bytes()
    second = run_quickstart(out)
    assert second.returncode == 0, second.stderr[-3000:]
    for stage in ("data", "teacher", "cache", "inspect", "student", "train", "export"):
        assert f"{stage}: already done" in second.stdout
    assert (out / "cache" / "train" / "shard-00000.arrow").read_bytes() == shard_bytes
