"""Plain next-token training of a small teacher, for the quickstart and the
proof benchmark (a real distillation needs a teacher that knows something)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

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


def pretrain(model, input_ids: np.ndarray, labels: np.ndarray, cfg: PretrainConfig, progress=None) -> dict:
    """Train on random batches of rows; returns losses and tokens/s."""
    model.to(cfg.device).train()
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    use_autocast = cfg.device.startswith("cuda") and cfg.dtype != torch.float32
    losses, tokens, start = [], 0, time.perf_counter()
    for step in range(cfg.steps):
        rows = rng.integers(0, len(input_ids), cfg.batch_size)
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
        if progress is not None:
            progress(step + 1, losses[-1])
    elapsed = time.perf_counter() - start
    model.eval()
    return {"final_loss": float(np.mean(losses[-10:])), "first_loss": losses[0], "tokens": tokens,
            "tokens_per_s": tokens / elapsed, "seconds": elapsed}
