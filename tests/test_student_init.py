"""The student every rank starts from: built on each rank's own device from the same seed or the same
safetensors files, so 1 rank and 2 gloo ranks (FSDP2, frozen weights replicated or sharded) hold
identical weights before the first step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from demo.tiny_models import tiny_gpt_oss_config
from student_train.model import load_student
from train_fixtures import VOCAB, make_rows, save_tiny_student, tiny_config, tiny_teacher, write_cache

REPO = Path(__file__).resolve().parents[1]

# Builds the trainer's model on each rank and writes the full state (trained shards gathered,
# frozen tensors as each rank holds them) from every rank.
DUMP_INITIAL = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from common.parent_death import die_with_parent
die_with_parent()  # a rank never outlives torchrun's agent (a timed-out test kills the agent)
from student_train.config import load_config
from student_train.trainer import Trainer
cfg = load_config(sys.argv[1])
trainer = Trainer(cfg)
state = {}
for name, t in trainer.model.state_dict().items():
    state[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().contiguous().clone()
out = Path(sys.argv[2])
save_file(state, str(out / f"rank{trainer.env.rank}.safetensors"))
# How this rank holds each frozen parameter: sharded by FSDP2 (a DTensor) or whole.
sharded = {n: hasattr(p, "full_tensor") for n, p in trainer.model.named_parameters() if not p.requires_grad}
(out / f"frozen-rank{trainer.env.rank}.json").write_text(json.dumps(sharded))
trainer.close()
from student_train import parallel
parallel.shutdown()
"""


@pytest.fixture(scope="module")
def init_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("init")
    write_cache(tmp / "train", make_rows(8, 8, 16, seed=0), tiny_teacher(), hidden_layers=(2,))
    config_dir = tmp / "student-config"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps(tiny_gpt_oss_config(VOCAB, hidden_size=64, num_layers=2)
                                                       .to_dict()))
    return tmp, config_dir


def dump_initial(tmp: Path, config_dir: Path, name: str, nproc: int, *sets: str) -> list[dict]:
    cfg = tiny_config(tmp / name, config_dir, tmp / "train", None, "student.path=null",
                      f"student.init_config={config_dir}", "data.micro_batch=1", "data.global_batch=2",
                      "data.seq_len=16", "student.experts_implementation=eager", *sets)
    from student_train.config import save_config

    config_path = save_config(cfg, tmp / f"{name}.yaml")
    out = tmp / f"{name}-weights"
    out.mkdir()
    (tmp / "dump.py").write_text(DUMP_INITIAL)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(tmp / "dump.py"), str(config_path), str(out)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cmd[1:]]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [load_file(str(out / f"rank{r}.safetensors")) for r in range(nproc)]


def frozen_sharded(tmp: Path, name: str, rank: int) -> dict[str, bool]:
    return json.loads((tmp / f"{name}-weights" / f"frozen-rank{rank}.json").read_text())


@pytest.mark.parametrize("frozen", ["replicate", "shard"])
def test_one_and_two_ranks_start_from_identical_weights(init_setup, frozen):
    tmp, config_dir = init_setup
    (one,) = dump_initial(tmp, config_dir, f"one-{frozen}", 1, f"frozen_weights={frozen}")
    two = dump_initial(tmp, config_dir, f"two-{frozen}", 2, f"frozen_weights={frozen}")
    assert set(one) == set(two[0]) == set(two[1])
    assert any("experts" in k for k in one) and any("self_attn" in k for k in one)
    # The placement asked for: frozen weights whole on every rank, or sharded by FSDP2.
    for rank in (0, 1):
        placements = frozen_sharded(tmp, f"two-{frozen}", rank)
        assert placements and set(placements.values()) == {frozen == "shard"}, (rank, placements)
    for name, weight in one.items():
        assert weight.abs().sum() > 0 or "bias" in name or "sinks" in name, name  # never compare zeros only
        for rank, state in enumerate(two):
            assert torch.equal(state[name], weight), (frozen, rank, name)
    # The seed is what they share: another seed gives other weights.
    (other,) = dump_initial(tmp, config_dir, f"seed-{frozen}", 1, f"frozen_weights={frozen}", "seed=99")
    assert not torch.equal(other["student.model.layers.0.self_attn.q_proj.weight"],
                           one["student.model.layers.0.self_attn.q_proj.weight"])


def test_checkpoint_weights_load_onto_the_device_exactly(tmp_path):
    saved = save_tiny_student(tmp_path / "student")
    from student_train.config import StudentConfig
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(saved))
    loaded = load_student(StudentConfig(path=str(saved)), seed=123, device="cpu")
    expected, got = reference.state_dict(), loaded.state_dict()
    assert set(got) == set(expected) and expected
    for name, a in expected.items():
        assert torch.equal(got[name], a), name


def test_pickle_weights_are_refused_with_the_file_named(tmp_path):
    saved = save_tiny_student(tmp_path / "student")
    for f in saved.glob("*.safetensors"):
        f.unlink()
    (saved / "pytorch_model.bin").write_bytes(b"not loaded")
    from student_train.config import StudentConfig

    with pytest.raises(ValueError, match="pytorch_model.bin"):
        load_student(StudentConfig(path=str(saved)), device="cpu")


def test_a_checkpoint_of_another_shape_is_refused(tmp_path):
    saved = save_tiny_student(tmp_path / "student", hidden=64)
    other = save_tiny_student(tmp_path / "other", hidden=32)
    for f in saved.glob("*.safetensors"):
        f.unlink()
    for f in other.glob("*.safetensors"):
        (saved / f.name).write_bytes(f.read_bytes())
    from student_train.config import StudentConfig

    with pytest.raises(ValueError, match="has shape"):
        load_student(StudentConfig(path=str(saved)), device="cpu")


def test_checkpoints_hold_the_trained_state_and_refuse_other_frozen_weights(init_setup):
    """A checkpoint keeps trained weights and optimizer state, not the frozen majority; a resume whose
    rebuilt frozen weights differ (here: another seed for student.init_config) is refused by name."""
    import torch.distributed.checkpoint as dcp

    from student_train.trainer import Trainer

    tmp, config_dir = init_setup
    sets = ["student.path=null", f"student.init_config={config_dir}", "data.micro_batch=1", "data.global_batch=2",
            "data.seq_len=16", "student.experts_implementation=eager", "optim.steps=2", "checkpoint.every=1",
            "export.enabled=false"]
    cfg = tiny_config(tmp / "ckpt", config_dir, tmp / "train", None, *sets)
    trainer = Trainer(cfg)
    try:
        trainer.train()
        frozen = {n for n, p in trainer.model.named_parameters() if not p.requires_grad}
        trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    finally:
        trainer.close()
    step = Path(cfg.checkpoint.dir) / "step-00000002"
    saved = set(dcp.FileSystemReader(str(step)).read_metadata().state_dict_metadata)
    assert {f"model.{n}" for n in trained} <= saved
    assert not {f"model.{n}" for n in frozen} & saved
    assert frozen and json.loads((step / "frozen.json").read_text()).keys() == frozen

    resumed = Trainer(tiny_config(tmp / "ckpt", config_dir, tmp / "train", None, *sets, "optim.steps=3"), resume="")
    resumed.close()
    with pytest.raises(ValueError, match="frozen weight .* differs"):
        Trainer(tiny_config(tmp / "ckpt", config_dir, tmp / "train", None, *sets, "optim.steps=3", "seed=5"),
                resume="")
