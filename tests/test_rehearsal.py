"""The production rehearsal on CPU (`bench/rehearsal.py --device cpu`): every stage
runs through the CLI, and the table's claims hold."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "cache", "cache_1gpu", "autotune", "train_a", "train_b", "train_c", "train_1gpu", "export",
          "from_export")
STEPS = 30


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("rehearsal")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "bench/rehearsal.py", "--device", "cpu", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, json.loads((out / "rehearsal.json").read_text()), proc.stdout


@pytest.mark.slow
def test_every_stage_ran_or_says_why_not(rehearsal):
    _, report, stdout = rehearsal
    assert tuple(report["stages"]) == STAGES
    for name, result in report["stages"].items():
        if name in ("cache_1gpu", "train_1gpu"):
            assert result == {"status": "skipped: GPU only"}
        else:
            assert result["stage_seconds"] > 0, name
    assert "| stage | figure | value | from |" in stdout
    assert "8x B200 | PROJECTION" in report["plan_text"] and report["plan_text"] in stdout


@pytest.mark.slow
def test_the_dataset_has_the_phase1_schema(rehearsal):
    from datasets import load_from_disk

    out, _, _ = rehearsal
    splits = load_from_disk(str(out / "work" / "data"))
    assert set(splits) == {"train", "validation"}
    features = splits["train"].features
    assert str(features["input_ids"]) == str(features["labels"]) == "List(Value('int32'))"
    assert set(features["source"]) == {"dataset", "language", "exercise", "meta_json"}
    assert set(features["spans"]) == {"assistant_token_start", "analysis_token_count", "final_token_count"}
    assert {row["dataset"] for row in splits["train"]["source"]} == {"SYNTH", "OpenCodeInstruct", "Nemotron-Math-v2",
                                                                    "oasst2"}
    for row in splits["train"]:
        start, spans = row["spans"]["assistant_token_start"], row["spans"]
        assert set(row["labels"][:start]) == {-100} and row["labels"][start:] == row["input_ids"][start:]
        assert spans["analysis_token_count"] + spans["final_token_count"] == len(row["input_ids"]) - start
        assert set(row["attention_mask"]) == {1}


@pytest.mark.slow
def test_the_cache_verifies_and_every_figure_is_measured(rehearsal):
    _, report, _ = rehearsal
    stages = report["stages"]
    assert report["checks"]["cache_verified"] is True
    cache = stages["cache"]["train"]
    assert cache["rows"] == stages["prepare"]["data"]["train"]["rows"]
    assert cache["steady_tokens_per_s_per_gpu"] > 0 and cache["first_shard_s"] > 0
    assert stages["autotune"]["plans"][0]["target_gbs"] == 256
    train = stages["train_a"]
    assert train["tokens_per_s_per_gpu"] > 0 and train["time_to_first_step_s"] > 0
    assert train["checkpoint"]["bytes"] > 0 and train["save_s"] and stages["train_c"]["load_s"]
    assert train["peak_host_gib"] > 0 and train["export_write_s"] is not None
    inputs = report["plan_inputs"]
    assert inputs["cache_tokens_per_s_one_gpu"] > 0 and inputs["file_bytes_per_token"] > 0


@pytest.mark.slow
def test_resumed_run_equals_the_uninterrupted_one_exactly(rehearsal):
    _, report, _ = rehearsal
    a, c = report["stages"]["train_a"], report["stages"]["train_c"]
    assert a["steps"] == c["steps"] == list(range(1, STEPS + 1))
    assert c["kill"]["returncode"] < 0 and c["kill"]["checkpoints"] == ["step-00000010"]
    assert c["kill"]["last_step_logged"] < STEPS
    for key in ("c_vs_a", "c_vs_a_eval", "b_vs_a"):
        assert report["checks"][key]["same_steps"] and report["checks"][key]["bitwise_equal"], key
    assert c["losses"] == a["losses"]


@pytest.mark.slow
def test_the_export_loads_and_its_forward_is_finite(rehearsal):
    _, report, _ = rehearsal
    export = report["stages"]["export"]
    assert export["finite"] is True and report["checks"]["export_forward_finite"] is True
    assert export["logits_shape"] == [1, 16, report["stages"]["prepare"]["vocab_size"]]
    assert export["load_s"] > 0 and export["forward_s"] > 0


@pytest.mark.slow
def test_a_run_starts_from_the_export_on_two_ranks_and_on_one(rehearsal):
    """`student.path` = run A's export: the student comes back trained (its first loss, on the
    batch run A started from, is below run A's first), on 2 ranks and on 1."""
    _, report, stdout = rehearsal
    result = report["stages"]["from_export"]
    first_a = report["stages"]["train_a"]["losses"][0]
    assert result["export_run"] == "A"
    for key, world in (("ranks_2", 2), ("ranks_1", 1)):
        r = result[key]
        assert r["world"] == world and r["steps"] == [1, 2, 3, 4]
        assert r["startup_s"] > 0 and r["time_to_first_step_s"] > 0 and r["peak_host_gib"] > 0
        assert r["losses"][0][1] < first_a[1] - 0.1, (r["losses"][0], first_a)
    assert "| from export | 2 rank(s): build / first step / peak host |" in stdout
