"""Padding micro batches to a multiple of N tokens (a few shapes for compiled steps) changes no loss:
pads are masked out of attention, CE, KL and the hidden cosine."""

from __future__ import annotations

import json

import pytest

from student_train.trainer import Trainer
from train_fixtures import make_rows, save_tiny_student, tiny_config, tiny_teacher, write_cache


def test_padded_micro_batches_train_to_the_same_losses(tmp_path):
    write_cache(tmp_path / "train", make_rows(8, 6, 13, seed=3), tiny_teacher(), hidden_layers=(2,))
    student = save_tiny_student(tmp_path / "student")
    logs = {}
    for pad in (1, 16):
        cfg = tiny_config(tmp_path / f"pad{pad}", student, tmp_path / "train", None, f"data.pad_to_multiple={pad}",
                          "data.micro_batch=2", "data.global_batch=4", "data.seq_len=16", "optim.steps=2",
                          "loss.kl=0.5", "loss.hidden_cosine=0.5", "loss.layer_pairs=[[2,2]]",
                          "student.experts_implementation=eager", "checkpoint.every=0", "export.enabled=false")
        trainer = Trainer(cfg)
        try:
            shapes = {next(iter(trainer.train_loader)).input_ids_BL.shape[1]}
            trainer.train()
        finally:
            trainer.close()
        if pad > 1:
            assert shapes == {16}
        logs[pad] = [r for r in map(json.loads, cfg.jsonl_path.read_text().splitlines()) if r["kind"] == "train"]
    assert len(logs[1]) == 2
    for plain, padded in zip(logs[1], logs[16]):
        for key in ("loss", "ce", "kl", "hidden_cos", "grad_norm", "valid_tokens"):
            assert padded[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7), key
