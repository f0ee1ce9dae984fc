"""Reading a student's safetensors straight onto the device it trains on.

Every rank builds the whole student on its own device and fills it from the
checkpoint's safetensors files tensor by tensor (`safe_open` maps the files, so
the ranks of a node share one copy in the page cache and no rank holds the
model in its own host memory). That is what replicated frozen weights need
anyway, and it takes seconds where reading the model on rank 0's host and
broadcasting it took minutes at 21B parameters.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn


def load_safetensors_into(model: nn.Module, files: list[Path]) -> list[str]:
    """Copies every tensor of the files (`safetensors_files`) into `model`'s same-named parameter or
    buffer, on its device.

    Returns the model's keys the files did not hold (tied weights are fine); raises
    ValueError when the files hold a key the model lacks or a tensor of another shape,
    so a checkpoint of another architecture never loads partially.
    """
    from safetensors import safe_open

    targets = dict(model.state_dict(keep_vars=True))
    device = next(iter(targets.values())).device
    loaded: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                if key not in targets:
                    raise ValueError(f"{path}: tensor {key!r} is not a parameter of {type(model).__name__}")
                target = targets[key]
                source = f.get_tensor(key)
                if tuple(source.shape) != tuple(target.shape):
                    raise ValueError(f"{path}: tensor {key!r} has shape {tuple(source.shape)}, the model's is "
                                     f"{tuple(target.shape)}")
                with torch.no_grad():
                    target.copy_(source.to(device=target.device, dtype=target.dtype))
                loaded.add(key)
    return sorted(set(targets) - loaded)


def untied_missing(model: nn.Module, missing: list[str]) -> list[str]:
    """Of `missing`, the keys that are not the same tensor as a loaded one (tied lm_head / embeddings)."""
    state = model.state_dict(keep_vars=True)
    missing_set = set(missing)
    loaded_ptrs = {t.data_ptr() for k, t in state.items() if k not in missing_set and t.numel()}
    return [k for k in missing if state[k].numel() and state[k].data_ptr() not in loaded_ptrs]
