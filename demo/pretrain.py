"""Plain next-token training of a small teacher, for the quickstart and the
proof benchmark (a real distillation needs a teacher that knows something)."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.atomic import publish, tmp_path_for
from common.causal_lm import IGNORE_INDEX


@dataclass
class PretrainConfig:
    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.01
    seed: int = 0
    device: str = "cpu"
    dtype: torch.dtype = torch.float32  # autocast dtype on GPU (bf16)


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def causal_lm_loss(model, input_ids_BL: torch.Tensor, labels_BL: torch.Tensor) -> torch.Tensor:
    """Mean CE of logits at t against labels at t+1 (the shift is explicit)."""
    logits_BLV = model(input_ids=input_ids_BL).logits
    return F.cross_entropy(logits_BLV[:, :-1].flatten(0, 1).float(), labels_BL[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def evaluate_lm(model, input_ids: np.ndarray, labels: np.ndarray, batch_size: int, device: str) -> float:
    """Token-averaged CE (nats) over all rows."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(input_ids), batch_size):
        ids = torch.as_tensor(input_ids[start:start + batch_size], dtype=torch.long, device=device)
        lab = torch.as_tensor(labels[start:start + batch_size], dtype=torch.long, device=device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        target = lab[:, 1:]
        total += F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((target != IGNORE_INDEX).sum())
    model.train()
    return total / max(count, 1)


STATE_FILE = "pretrain_state.pt"


def _run_key(cfg: PretrainConfig, input_ids: np.ndarray) -> str:
    """What a saved state must have been made with to be continued."""
    return repr(({**dataclasses.asdict(cfg), "dtype": str(cfg.dtype)}, input_ids.shape))


def _save_state(state_dir: Path, key: str, model, opt, step: int, losses: list[float], tokens: int,
                seconds: float) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(state_dir / STATE_FILE)
    torch.save({"key": key, "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "losses": losses, "tokens": tokens, "seconds": seconds}, tmp)
    publish(tmp, state_dir / STATE_FILE)


def pretrain(model, input_ids: np.ndarray, labels: np.ndarray, cfg: PretrainConfig, progress=None,
             state_dir: Path | None = None, save_every: int = 0) -> dict:
    """Train on random batches of rows; returns losses and tokens/s.

    With `state_dir` and `save_every`, the weights, optimizer state and step are saved there every
    `save_every` steps, and a call that finds them continues from there: the same rows in the same
    order, so a run cut off and continued ends with the weights of one that never stopped (where
    the kernels are deterministic). `model` must come in as the uncut run's did (its initial weights)."""
    model.to(cfg.device).train()
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    use_autocast = cfg.device.startswith("cuda") and cfg.dtype != torch.float32
    losses, tokens, first_step, seconds_before = [], 0, 0, 0.0
    key = _run_key(cfg, input_ids)
    if state_dir is not None and (state_dir / STATE_FILE).is_file():
        # written by _save_state above in this work directory: tensors, numbers and lists only
        state = torch.load(state_dir / STATE_FILE, map_location=cfg.device, weights_only=True)
        if state["key"] != key:
            raise ValueError(f"{state_dir / STATE_FILE}: saved by a run with other settings ({state['key']}); "
                             f"this one is {key}: remove it to start over")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        first_step, losses, tokens, seconds_before = state["step"], state["losses"], state["tokens"], state["seconds"]
    start = time.perf_counter()
    for step in range(cfg.steps):
        rows = rng.integers(0, len(input_ids), cfg.batch_size)  # drawn for skipped steps too: same order
        if step < first_step:
            continue
        ids = torch.as_tensor(input_ids[rows], dtype=torch.long, device=cfg.device)
        lab = torch.as_tensor(labels[rows], dtype=torch.long, device=cfg.device)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        with torch.autocast(device_type="cuda", dtype=cfg.dtype, enabled=use_autocast):
            loss = causal_lm_loss(model, ids, lab)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += ids.numel()
        if state_dir is not None and save_every and (step + 1) % save_every == 0 and step + 1 < cfg.steps:
            _save_state(state_dir, key, model, opt, step + 1, losses, tokens,
                        seconds_before + time.perf_counter() - start)
        if progress is not None:
            progress(step + 1, losses[-1])
    elapsed = seconds_before + time.perf_counter() - start
    model.eval()
    return {"final_loss": float(np.mean(losses[-10:])), "first_loss": losses[0], "tokens": tokens,
            "tokens_per_s": tokens / elapsed, "seconds": elapsed}
