"""`vpmoe train` config: typed loading, overrides, errors that name the key, and
the shipped configs holding the user's numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from student_train.config import grad_accum_steps, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


MINIMAL = "student:\n  path: /models/s\ndata:\n  train_cache: /cache/t\neval:\n  every: 0\n"


def test_unknown_key_names_it_and_suggests_the_close_one(tmp_path):
    path = write(tmp_path, MINIMAL + "optim:\n  lrr: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown config key 'optim\.lrr'; did you mean 'optim\.lr'\?") as err:
        load_config(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"unknown config key 'dta'; did you mean 'data'\?"):
        load_config(write(tmp_path, MINIMAL + "dta:\n  seed: 1\n"))


def test_unknown_override_key_names_it(tmp_path):
    with pytest.raises(ValueError, match=r"--set loss\.kl_temprature: unknown config key 'loss\.kl_temprature'; "
                                         r"did you mean 'loss\.kl_temperature'\?"):
        load_config(write(tmp_path, MINIMAL), ["loss.kl_temprature=2"])
    with pytest.raises(ValueError, match=r"'optim\.lr' is not a section"):
        load_config(write(tmp_path, MINIMAL), ["optim.lr.x=2"])


def test_mistyped_values_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"config key 'data\.micro_batch' expects an integer, got 'two'"):
        load_config(write(tmp_path, MINIMAL), ["data.micro_batch=two"])
    with pytest.raises(ValueError, match=r"config key 'data\.shuffle' expects true or false"):
        load_config(write(tmp_path, MINIMAL), ["data.shuffle=3"])
    with pytest.raises(ValueError, match=r"config key 'loss\.layer_pairs\[0\]\[1\]' expects an integer"):
        load_config(write(tmp_path, MINIMAL), ["loss.layer_pairs=[[1, x]]"])
    with pytest.raises(ValueError, match=r"config key 'optim\.betas' expects a list"):
        load_config(write(tmp_path, MINIMAL), ["optim.betas=0.9"])


def test_values_are_converted_to_the_declared_types(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "optim:\n  lr: 3e-4\n"),  # YAML 1.1 reads 3e-4 as a string
                      ["optim.min_lr=1e-6", "data.global_batch=64", "loss.layer_pairs=[[2, 4], [3, 6]]",
                       "data.eval_cache=null", "student.attn_implementation=sdpa", "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.min_lr == pytest.approx(1e-6)
    assert cfg.data.global_batch == 64 and cfg.loss.layer_pairs == [[2, 4], [3, 6]]
    assert cfg.data.eval_cache is None and cfg.student.attn_implementation == "sdpa"
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.loss.to_loss_config().layer_pairs == ((2, 4), (3, 6))


def test_cross_key_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="data.eval_cache: eval.every > 0 needs an eval cache"):
        load_config(write(tmp_path, MINIMAL), ["eval.every=10"])
    with pytest.raises(ValueError, match="student.path: set exactly one of"):
        load_config(write(tmp_path, MINIMAL), ["student.init_config=/x"])
    with pytest.raises(ValueError, match="loss.kl_mode: must be one of"):
        load_config(write(tmp_path, MINIMAL), ["loss.kl_mode=full"])
    with pytest.raises(ValueError, match="loss: hidden_cosine_weight > 0 needs layer_pairs"):
        load_config(write(tmp_path, MINIMAL), ["loss.hidden_cosine=0.5"])
    with pytest.raises(ValueError, match="student.frozen_dtype: a dtype other than student.dtype needs device cuda"):
        load_config(write(tmp_path, MINIMAL), ["student.frozen_dtype=bf16", "device=cpu"])


def test_grad_accumulation_from_global_batch_and_world_size(tmp_path):
    cfg = load_config(CONFIGS / "phase1_gptoss20b_8xh100.yaml")
    assert grad_accum_steps(cfg.data, 8) == 32  # 256 = 1 x 32 x 8
    assert grad_accum_steps(cfg.data, 4) == 64
    with pytest.raises(ValueError, match="data.global_batch=256 is not a multiple of micro_batch x world size = 1 x 3"):
        grad_accum_steps(cfg.data, 3)
    cfg = load_config(write(tmp_path, MINIMAL), ["data.global_batch=0", "data.grad_accum=5"])
    assert grad_accum_steps(cfg.data, 8) == 5
    cfg = load_config(write(tmp_path, MINIMAL), ["data.global_batch=16", "data.grad_accum=3", "data.micro_batch=2"])
    with pytest.raises(ValueError, match="data.grad_accum=3 disagrees with data.global_batch=16"):
        grad_accum_steps(cfg.data, 2)


def test_phase1_config_holds_the_users_numbers():
    cfg = load_config(CONFIGS / "phase1_gptoss20b_8xh100.yaml")
    assert (cfg.loss.ce, cfg.loss.kl, cfg.loss.kl_temperature, cfg.loss.hidden_cosine) == (0.2, 0.2, 2.0, 0.6)
    assert cfg.loss.kl_mode == "tail" and cfg.loss.layer_pairs
    o = cfg.optim
    assert (o.name, o.lr, o.betas, o.weight_decay, o.warmup_ratio, o.min_lr, o.grad_clip) == \
        ("adamw", 3e-4, [0.9, 0.95], 0.1, 0.025, 1e-5, 0.5)
    d = cfg.data
    assert (d.global_batch, d.micro_batch, d.seq_len) == (256, 1, 4096)
    assert (cfg.eval.every, cfg.eval.samples, cfg.checkpoint.every, cfg.checkpoint.keep) == (100, 64, 200, 3)
    assert cfg.student.trust_remote_code and cfg.student.compute_dtype == "bf16"
    assert cfg.student.train == [r"\.self_attn\.", r"\.mlp\.router\."]
    assert cfg.student.freeze == [r"\.experts\.", "embed_tokens", "lm_head", "norm"]
    smoke = load_config(CONFIGS / "phase1_gptoss20b_smoke.yaml")
    assert smoke.optim.steps == 100 and smoke.loss == cfg.loss and smoke.student == cfg.student
    tiny = load_config(CONFIGS / "tiny_cpu.yaml")
    assert tiny.device == "cpu" and tiny.loss.hidden_cosine > 0


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(CONFIGS / "tiny_cpu.yaml", ["optim.lr=1e-3", "loss.layer_pairs=[[1, 2]]"])
    assert load_config(save_config(cfg, tmp_path / "saved.yaml")) == cfg


def test_train_command_reports_a_typo_and_exits_before_training(tmp_path):
    from cli.main import app

    path = write(tmp_path, MINIMAL)
    result = CliRunner().invoke(app, ["train", str(path), "--set", "optim.wd=0.1"])
    assert result.exit_code == 2
    assert "unknown config key 'optim.wd'" in result.output
    result = CliRunner().invoke(app, ["autotune", str(path), "--set", "optim.lr=abc"])
    assert result.exit_code == 2 and "'optim.lr' expects a number" in result.output


def test_train_command_parses_resume_and_overrides(tmp_path, monkeypatch):
    import student_train.trainer as trainer_mod
    from cli.main import app

    seen = []

    class Summary:
        steps, tokens, tokens_per_s, last_checkpoint, export_dir = 0, 0, 0.0, None, None

    monkeypatch.setattr(trainer_mod, "run", lambda cfg, resume: seen.append((cfg.optim.lr, resume)) or Summary())
    path = write(tmp_path, MINIMAL)
    for args, expected in ((["--resume"], (3e-4, "")), (["--resume", "/ck/step-00000002"], (3e-4, "/ck/step-00000002")),
                           (["--resume", "--set", "optim.lr=0.1"], (0.1, "")), ([], (3e-4, None)),
                           (["--set", "optim.lr=0.2", "optim.steps=3"], (0.2, None))):
        result = CliRunner().invoke(app, ["train", str(path), *args])
        assert result.exit_code == 0, result.output
        assert seen[-1] == expected, args


@pytest.mark.parametrize("sets,message", [
    (["export.dir={run}"], r"checkpoint\.dir \S+/run/checkpoints lies inside export\.dir \S+/run: run outputs"),
    (["log.jsonl={run}/checkpoints/log.jsonl"], r"checkpoint\.dir \S+ contains log\.jsonl \S+/checkpoints/log\.jsonl"),
    (["log.tensorboard={run}/export"], r"export\.dir \S+ is the same path as log\.tensorboard"),
    (["data.train_cache={run}/export/cache"], r"data\.train_cache \S+ lies inside export\.dir \S+: an input must not"),
    (["student.path={run}/checkpoints"], r"student\.path \S+ is the same path as checkpoint\.dir"),
    (["export.dir={link}"], r"lies inside export\.dir \S+/link \(= \S+/run\)"),  # symlinks are resolved
])
def test_overlapping_run_paths_are_refused_when_the_config_loads(tmp_path, sets, message):
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "link").symlink_to(run)
    base = [f"checkpoint.dir={run / 'checkpoints'}", f"log.jsonl={run / 'log.jsonl'}", f"export.dir={run / 'export'}"]
    with pytest.raises(ValueError, match=message) as err:
        load_config(write(tmp_path, MINIMAL), base + [s.format(run=run, link=tmp_path / "link") for s in sets])
    assert "\n" not in str(err.value)
    load_config(write(tmp_path, MINIMAL), base)  # side by side in one run directory: fine


def test_train_command_refuses_an_export_dir_holding_the_checkpoints_before_any_work(tmp_path):
    from cli.main import app

    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(write(tmp_path, MINIMAL)), "--set", f"checkpoint.dir={run}/checkpoints",
                                      f"export.dir={run}", "--nproc-per-node", "2"])
    assert result.exit_code == 2
    assert f"checkpoint.dir {run}/checkpoints lies inside export.dir {run}" in result.output
    assert not run.exists()
