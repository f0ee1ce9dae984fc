"""What a checkpoint keeps of the model: the trained state, and a fingerprint of the frozen rest.

Frozen weights never change during a run: they are rebuilt at every start from
`student.path` or `student.init_config` and the seed. A checkpoint therefore
stores the trained parameters and the buffers (0.64B values for GPT-OSS-20B
phase 1 instead of 21B, a few GB instead of 42) plus, per frozen tensor, its
float64 sum and norm; a resume whose rebuilt frozen weights differ (another
student.path, another seed, other files) is refused by name instead of
training on weights the checkpoint never saw.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

FROZEN_FILE = "frozen.json"
RELATIVE_TOLERANCE = 1e-6  # sums over the same values in another reduction order


def frozen_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if not p.requires_grad}


def trained_state(model_sd: dict, frozen: set[str]) -> dict:
    """The model state dict without the frozen parameters (trained ones and buffers stay)."""
    return {k: v for k, v in model_sd.items() if k not in frozen}


def frozen_fingerprint(model: nn.Module) -> dict[str, list[float]]:
    """[sum, norm] in float64 of every frozen parameter, the same on every rank."""
    prints = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        full = p.full_tensor() if hasattr(p, "full_tensor") else p  # DTensor when frozen weights are sharded
        with torch.no_grad():
            prints[name] = [float(full.sum(dtype=torch.float64)),
                            float(torch.linalg.vector_norm(full, dtype=torch.float64))]
    return prints


def check_fingerprint(path: Path, now: dict[str, list[float]]) -> None:
    """ValueError naming the first frozen tensor whose fingerprint `now` (`frozen_fingerprint`) is not
    the one the checkpoint trained against."""
    file = Path(path) / FROZEN_FILE
    if not file.is_file():
        raise ValueError(f"{file}: missing (a checkpoint stores the fingerprint of the frozen weights)")
    try:
        saved = json.loads(file.read_text())
        assert isinstance(saved, dict)
    except (ValueError, AssertionError):
        raise ValueError(f"{file}: not a frozen-weights fingerprint") from None
    if set(saved) != set(now):
        extra = sorted(set(saved) ^ set(now))[:3]
        raise ValueError(f"{file}: the frozen parameters differ from this run's (e.g. {extra}); "
                         "check student.train / student.freeze")
    for name, (total, norm) in saved.items():
        now_total, now_norm = now[name]
        scale = max(abs(norm), 1e-30)
        if abs(now_norm - norm) > RELATIVE_TOLERANCE * scale or abs(now_total - total) > RELATIVE_TOLERANCE * scale:
            raise ValueError(f"{file}: frozen weight {name} differs from the one this checkpoint trained with "
                             f"(norm {now_norm:.6g} vs {norm:.6g}): student.path, student.init_config or seed "
                             "changed since")
