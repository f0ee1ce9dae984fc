"""Files a user may be handed run no code: a crafted checkpoint is refused by name
and its payload never runs; pickle-format model weights are refused by name."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from student_train.checkpoint_reader import load_checkpoint_state, read_metadata
from student_train.config import save_config
from student_train.trainer import Trainer
from train_fixtures import make_rows, save_tiny_student, tiny_config, tiny_teacher, write_cache

SMALL = ["data.seq_len=16", "data.micro_batch=4", "data.global_batch=8", "student.experts_implementation=eager",
         "export.enabled=false", "optim.steps=1", "checkpoint.every=1"]


class CreatesFile:
    """Unpickling this opens (creates) `path`: the stand-in for any payload."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A cache, a student and a real one-step checkpoint."""
    tmp = tmp_path_factory.mktemp("trained")
    write_cache(tmp / "train", make_rows(8, 10, 16, seed=0), tiny_teacher())
    student = save_tiny_student(tmp / "student")
    trainer = Trainer(tiny_config(tmp, student, tmp / "train", None, *SMALL, "loss.hidden_cosine=0"))
    try:
        trainer.train()
    finally:
        trainer.close()
    return tmp, student, trainer.last_checkpoint


def resume_command(tmp: Path, student: Path, train_cache: Path, checkpoint: Path) -> list[str]:
    cfg = tiny_config(tmp, student, train_cache, None, *SMALL, "loss.hidden_cosine=0", "optim.steps=2")
    return ["train", str(save_config(cfg, tmp / "resume.yaml")), "--resume-from", str(checkpoint)]


def test_a_real_checkpoint_resumes_through_the_restricted_reader(trained, tmp_path):
    tmp, student, checkpoint = trained
    assert read_metadata(checkpoint).state_dict_metadata  # DCP's own classes pass the allow-list
    result = CliRunner().invoke(app, resume_command(tmp_path, student, tmp / "train", checkpoint))
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and "done: 2 steps" in result.output


def test_crafted_checkpoint_metadata_is_refused_by_resume_from_and_never_runs(trained, tmp_path):
    tmp, student, checkpoint = trained
    crafted = tmp_path / "step-00000001"
    shutil.copytree(checkpoint, crafted)
    marker = tmp_path / "payload-ran"
    with open(crafted / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own checkpoint: trusted here
    metadata.storage_meta.modules = [CreatesFile(marker)]  # unpickled with plain pickle, this would still resume
    (crafted / ".metadata").write_bytes(pickle.dumps(metadata))

    result = CliRunner().invoke(app, resume_command(tmp_path, student, tmp / "train", crafted))
    assert result.exit_code == 2, result.output  # bad input: one line, exit 2
    assert f"error: {crafted}/.metadata: refers to" in result.output
    assert "which checkpoint metadata never holds; refused without running it" in result.output
    assert "Traceback" not in result.output
    assert not marker.exists()


def test_a_crafted_non_tensor_entry_is_refused_and_never_runs(tmp_path):
    import torch.distributed.checkpoint as dcp

    plain = {"weight": torch.arange(3.0), "param_groups": [{"lr": 0.5, "betas": (0.9, 0.95), "params": ["w"]}]}
    dcp.save(plain, checkpoint_id=str(tmp_path / "plain"), no_dist=True)
    state = {"weight": torch.zeros(3), "param_groups": [{"lr": 0.0, "betas": (0.0, 0.0), "params": []}]}
    load_checkpoint_state(state, tmp_path / "plain", no_dist=True)
    assert torch.equal(state["weight"], plain["weight"]) and state["param_groups"] == plain["param_groups"]

    marker = tmp_path / "payload-ran"
    dcp.save({"weight": torch.arange(3.0), "param_groups": [{"lr": CreatesFile(marker)}]},
             checkpoint_id=str(tmp_path / "crafted"), no_dist=True)
    with pytest.raises(ValueError, match=r"crafted: entry 'param_groups\.0\.lr' holds more than plain data; refused"):
        load_checkpoint_state({"weight": torch.zeros(3), "param_groups": [{"lr": 0.0}]}, tmp_path / "crafted",
                              no_dist=True)
    assert not marker.exists()


def pickled_copy(model_dir: Path, out: Path) -> Path:
    """The model's config and its weights as pytorch_model.bin (a pickle) only."""
    from safetensors.torch import load_file

    out.mkdir()
    shutil.copy(model_dir / "config.json", out / "config.json")
    torch.save(load_file(str(model_dir / "model.safetensors")), out / "pytorch_model.bin")
    return out


def test_a_student_holding_only_pytorch_model_bin_is_refused_by_name(trained, tmp_path):
    tmp, student, _ = trained
    bin_student = pickled_copy(student, tmp_path / "bin_student")
    cfg = tiny_config(tmp_path, bin_student, tmp / "train", None, *SMALL, "loss.hidden_cosine=0")
    result = CliRunner().invoke(app, ["train", str(save_config(cfg, tmp_path / "c.yaml"))])
    assert result.exit_code == 2, result.output  # bad input: one line, exit 2
    assert f"error: student.path {bin_student}: its weights are pytorch_model.bin, a pickle format" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_a_teacher_holding_only_pytorch_model_bin_is_refused_by_name(trained, tmp_path):
    import datasets

    _, student, _ = trained
    teacher = pickled_copy(student, tmp_path / "bin_teacher")

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5]]})}) \
        .save_to_disk(str(tmp_path / "data"))
    result = CliRunner().invoke(app, ["cache-teacher", "--model", str(teacher), "--data", str(tmp_path / "data"),
                                      "--out", str(tmp_path / "cache"), "--backend", "hf", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert f"model {teacher}: its weights are pytorch_model.bin" in result.output.replace("\n", "")
    assert not (tmp_path / "cache").exists()
