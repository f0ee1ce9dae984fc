"""`vpmoe train` on input it cannot use: an eval cache of another teacher, an
empty cache, rows longer than data.seq_len, a malformed manifest (one line,
exit 2); and a restart never logs a step twice."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from common.manifest import MANIFEST_NAME, teacher_differences
from demo.tiny_models import save_model
from student_train.metrics import MetricsLogger
from student_train.trainer import Trainer
from train_fixtures import VOCAB, make_rows, save_tiny_student, tiny_config, tiny_teacher, write_cache

SMALL = ["data.seq_len=16", "data.micro_batch=4", "data.global_batch=8", "student.experts_implementation=eager",
         "export.enabled=false", "loss.hidden_cosine=0", "loss.layer_pairs=[]"]
TEACHER = {"model": "/models/teacher", "model_type": "llama", "config_hash": "c0", "weights_fingerprint": "w0",
           "backend": "hf", "dtype": "auto"}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("caches")
    teacher = tiny_teacher()
    ns = SimpleNamespace(tmp=tmp, teacher=teacher)
    ns.train, ns.eval, ns.empty = tmp / "train", tmp / "eval", tmp / "empty"
    write_cache(ns.train, make_rows(16, 10, 16, seed=0), teacher)
    write_cache(ns.eval, make_rows(8, 10, 16, seed=1), teacher)
    write_cache(ns.empty, [], teacher)
    for cache in (ns.train, ns.eval):
        set_teacher(cache, TEACHER)
    ns.student = save_tiny_student(tmp / "student")
    return ns


def set_teacher(cache: Path, teacher: dict) -> None:
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    manifest["teacher"] = teacher
    (cache / MANIFEST_NAME).write_text(json.dumps(manifest))


def config(tmp: Path, caches, *sets, train_cache=None, eval_cache=None):
    return tiny_config(tmp, caches.student, train_cache or caches.train, eval_cache, *SMALL, *sets)


def invoke_train(tmp: Path, caches, *sets, train_cache=None, eval_cache=None):
    base = [f"student.path={caches.student}", f"data.train_cache={train_cache or caches.train}",
            f"checkpoint.dir={tmp / 'run' / 'checkpoints'}", f"log.jsonl={tmp / 'run' / 'log.jsonl'}",
            f"data.eval_cache={eval_cache}" if eval_cache else "eval.every=0", *SMALL, *sets]
    config_file = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
    return CliRunner().invoke(app, ["train", str(config_file), *[a for s in base for a in ("--set", s)]])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


# ---------------------------------------------------------------- the eval cache's teacher


def test_teacher_differences_follow_content_not_location():
    moved = dict(TEACHER, model="openai/gpt-oss-20b")
    assert teacher_differences(TEACHER, moved) == []  # same weights, another path
    assert teacher_differences(TEACHER, dict(TEACHER, weights_fingerprint="w1")) == [
        "teacher weights_fingerprint 'w0' vs 'w1'"]
    assert teacher_differences(TEACHER, dict(TEACHER, config_hash="c1")) == ["teacher config_hash 'c0' vs 'c1'"]
    # Without a weights fingerprint on both sides, only the name tells two checkpoints apart.
    hub = dict(TEACHER, weights_fingerprint="")
    assert teacher_differences(hub, dict(moved, weights_fingerprint="")) == [
        "teacher model '/models/teacher' vs 'openai/gpt-oss-20b'"]
    assert teacher_differences({"model": "tiny"}, {"model": "tiny"}) == []


def test_eval_cache_of_another_teacher_is_refused(caches, tmp_path):
    other = tmp_path / "other_eval"
    write_cache(other, make_rows(8, 10, 16, seed=1), caches.teacher)
    set_teacher(other, dict(TEACHER, weights_fingerprint="w-finetuned"))
    with pytest.raises(ValueError) as err:
        Trainer(config(tmp_path, caches, eval_cache=other))
    message = str(err.value)
    assert message.startswith(f"{other}: made by another teacher than the train cache {caches.train}")
    assert "weights_fingerprint 'w0' vs 'w-finetuned'" in message and "data.allow_teacher_mismatch" in message
    assert "\n" not in message
    result = invoke_train(tmp_path / "cli", caches, eval_cache=other)
    assert_one_line_error(result, str(other), "another teacher")


def test_eval_cache_of_another_teacher_is_used_with_a_warning_when_allowed(caches, tmp_path, capsys):
    other = tmp_path / "other_eval"
    write_cache(other, make_rows(8, 10, 16, seed=1), caches.teacher)
    set_teacher(other, dict(TEACHER, config_hash="c-other"))
    trainer = Trainer(config(tmp_path, caches, "data.allow_teacher_mismatch=true", eval_cache=other))
    trainer.close()
    err = capsys.readouterr().err
    assert f"warning: {other}: made by another teacher" in err and "config_hash 'c0' vs 'c-other'" in err
    # the same teacher at another path is no mismatch at all
    set_teacher(other, dict(TEACHER, model="/elsewhere/teacher"))
    Trainer(config(tmp_path / "moved", caches, eval_cache=other)).close()


# ---------------------------------------------------------------- caches that cannot be trained on


def test_an_empty_cache_is_refused_by_name(caches, tmp_path):
    assert_one_line_error(invoke_train(tmp_path, caches, train_cache=caches.empty), str(caches.empty), "no shards")


def test_a_malformed_manifest_is_one_line_exit_2(caches, tmp_path):
    broken = tmp_path / "broken"
    write_cache(broken, make_rows(8, 10, 16, seed=2), caches.teacher)
    manifest = json.loads((broken / MANIFEST_NAME).read_text())
    manifest["shards"][0]["tokens"] = "many"
    (broken / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert_one_line_error(invoke_train(tmp_path, caches, train_cache=broken), str(broken / MANIFEST_NAME),
                          "key 'tokens' expects an integer")


def test_a_cache_teacher_run_on_the_phase1_layout_then_rows_longer_than_seq_len(caches, tmp_path):
    """String ids and struct columns beside the tokens (issue #20) are cached from input_ids and
    labels; training at a shorter data.seq_len names the shard and the first row too long."""
    rng = np.random.default_rng(5)
    rows = [rng.integers(0, VOCAB, int(n)).tolist() for n in (12, 40, 14, 13, 15, 12, 30, 16)]
    datasets.Dataset.from_dict({
        "id": [f"mix-{i}" for i in range(len(rows))],
        "input_ids": rows,
        "labels": [[-100] * 4 + r[4:] for r in rows],
        "source": [{"dataset": "d", "language": "en", "exercise": "x", "meta_json": "{}"} for _ in rows],
        "spans": [{"assistant_token_start": 4, "analysis_token_count": 2, "final_token_count": 3} for _ in rows],
    }).save_to_disk(str(tmp_path / "mix"))
    save_model(caches.teacher, tmp_path / "teacher")
    result = CliRunner().invoke(app, ["cache-teacher", "--model", str(tmp_path / "teacher"), "--data",
                                      str(tmp_path / "mix"), "--out", str(tmp_path / "cache"), "--top-k", "16",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert_one_line_error(invoke_train(tmp_path, caches, "data.seq_len=32", train_cache=tmp_path / "cache"),
                          "shard-00000.arrow: row 1 has 40 tokens", "seq_len=32")


# ---------------------------------------------------------------- the log on a restart


def log_steps(path: Path) -> list[tuple[str, int]]:
    return [(r["kind"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]


def test_a_resume_without_a_checkpoint_starts_the_log_afresh(caches, tmp_path):
    cfg = config(tmp_path, caches, "optim.steps=2", "checkpoint.every=0")
    cfg.jsonl_path.parent.mkdir(parents=True)
    old = [{"kind": "train", "step": s, "loss": 9.0} for s in (1, 2, 3)] + [{"kind": "summary", "step": 3}]
    cfg.jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in old) + '{"kind": "train", "st')
    trainer = Trainer(cfg, resume="")  # no checkpoint yet: step 0
    try:
        assert trainer.step == 0 and not cfg.jsonl_path.read_text()
        trainer.train()
    finally:
        trainer.close()
    assert log_steps(cfg.jsonl_path) == [("train", 1), ("train", 2), ("summary", 2)]


def test_the_log_keeps_exactly_the_steps_up_to_the_restored_one(tmp_path):
    path = tmp_path / "log.jsonl"
    records = [{"kind": "eval", "step": 0}, {"kind": "train", "step": 1}, {"kind": "train", "step": 2},
               {"kind": "eval", "step": 2}, {"kind": "train", "step": 3}]
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + '{"kind": "train", "step": 4, "lo')  # a line cut off by a kill
    MetricsLogger(path, is_main=True).truncate_after(2)
    assert log_steps(path) == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2)]
    MetricsLogger(path, is_main=False).truncate_after(0)  # other ranks never touch it
    assert len(log_steps(path)) == 4
    MetricsLogger(path, is_main=True).truncate_after(0)
    assert path.read_text() == ""
