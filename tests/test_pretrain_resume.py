"""The small teacher's pretraining (demo/pretrain.py) cut off and continued from its saved state
ends with the weights of a run that never stopped, and a state saved with other settings is
refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from demo.pretrain import STATE_FILE, PretrainConfig, pretrain
from demo.tiny_models import build_model, tiny_llama_config

CFG = PretrainConfig(steps=8, batch_size=4, lr=3e-3, warmup=2)


def rows(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(seed).integers(0, 64, size=(32, 16))
    labels = ids.copy()
    labels[:, :3] = -100
    return ids, labels


def fresh_model():
    return build_model(tiny_llama_config(64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                         intermediate_size=64, max_positions=16), seed=0, lm_head_scale=1.0)


class Cut(Exception):
    pass


def test_a_cut_run_continued_from_its_state_equals_the_uncut_run(tmp_path, one_thread):
    ids, labels = rows()
    straight = fresh_model()
    whole = pretrain(straight, ids, labels, CFG)

    def cut_after_5(step, loss):
        if step == 5:
            raise Cut()

    with pytest.raises(Cut):
        pretrain(fresh_model(), ids, labels, CFG, progress=cut_after_5, state_dir=tmp_path, save_every=3)
    assert torch.load(tmp_path / STATE_FILE, weights_only=True)["step"] == 3  # step 5 was lost with the cut
    continued = fresh_model()
    resumed = pretrain(continued, ids, labels, CFG, state_dir=tmp_path, save_every=3)
    for (name, a), (_, b) in zip(straight.state_dict().items(), continued.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed["tokens"] == whole["tokens"] and resumed["first_loss"] == whole["first_loss"]
    assert resumed["final_loss"] == whole["final_loss"]
    # the state stays from step 6 (the last save before the end) and is never taken for another run
    with pytest.raises(ValueError, match=f"{STATE_FILE}: saved by a run with other settings"):
        pretrain(fresh_model(), ids, labels, PretrainConfig(steps=9, batch_size=4, lr=3e-3, warmup=2),
                 state_dir=tmp_path, save_every=3)
