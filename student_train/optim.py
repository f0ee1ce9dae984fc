"""Optimizer and learning-rate schedule.

AdamW over the trained parameters, with no weight decay on norms, biases and
other 1-D parameters. With `optim.name: muon`, 2-D hidden weights (attention
and MLP matrices; not embeddings or the lm_head) use Muon, the rest AdamW, in
one optimizer so one state dict and one schedule cover both.

Muon (Jordan et al., 2024): SGD momentum whose update is orthogonalised with
a quintic Newton-Schulz iteration. Under FSDP2 a gradient is a row shard, so
the update is gathered to the full matrix, orthogonalised on every rank (the
same result everywhere) and each rank keeps its own rows.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

from student_train.config import OptimConfig

NO_DECAY = re.compile(r"(^|\.)(bias|[^.]*norm[^.]*)(\.|$)|_bias$|sinks$")
NOT_MUON = re.compile(r"embed|lm_head|projections\.")


@dataclass
class ParamGroups:
    muon: list[tuple[str, nn.Parameter]]
    decay: list[tuple[str, nn.Parameter]]
    no_decay: list[tuple[str, nn.Parameter]]


def group_parameters(model: nn.Module, use_muon: bool) -> ParamGroups:
    groups = ParamGroups([], [], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # frozen parameters never reach the optimizer
        if p.ndim < 2 or NO_DECAY.search(name):
            groups.no_decay.append((name, p))
        elif use_muon and p.ndim == 2 and not NOT_MUON.search(name):
            groups.muon.append((name, p))
        else:
            groups.decay.append((name, p))
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = group_parameters(model, use_muon=cfg.name == "muon")
    adam_groups = [dict(params=[p for _, p in groups.decay], weight_decay=cfg.weight_decay),
                   dict(params=[p for _, p in groups.no_decay], weight_decay=0.0)]
    adam_groups = [g for g in adam_groups if g["params"]]
    betas = (cfg.betas[0], cfg.betas[1])
    if cfg.name == "adamw":
        # fused needs every parameter on a supporting device; CPU keeps the plain loop (bitwise resume).
        fused = cfg.fused and device.type == "cuda"
        return torch.optim.AdamW(adam_groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused or None,
                                 foreach=None if fused else False)
    muon_group = dict(params=[p for _, p in groups.muon], use_muon=True, lr=cfg.muon_lr,
                      momentum=cfg.muon_momentum, ns_steps=cfg.muon_ns_steps, weight_decay=cfg.weight_decay)
    for g in adam_groups:
        g.update(use_muon=False, lr=cfg.lr, betas=betas, eps=cfg.eps)
    return Muon([muon_group] + adam_groups if muon_group["params"] else adam_groups)


def newton_schulz(g_AB: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximately U V^T of g's SVD: quintic iteration with the coefficients that maximise the slope at 0."""
    a, b, c = 3.4445, -4.7750, 2.0315
    # bf16 on GPU (as published); float32 on CPU where bf16 matmuls are slow.
    x = g_AB.to(torch.bfloat16 if g_AB.is_cuda else torch.float32)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        xx = x @ x.T
        x = a * x + (b * xx + c * xx @ xx) @ x
    return (x.T if transposed else x).to(g_AB.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for groups with use_muon=True, AdamW (decoupled decay) for the others."""

    def __init__(self, param_groups: list[dict]):
        super().__init__(param_groups, defaults={})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(p.grad)
            update = p.grad.add(buf, alpha=mu)  # Nesterov
            ortho = _orthogonalise_sharded(update, group["ns_steps"])
            rows, cols = p.shape
            p.mul_(1 - lr * wd)
            # Scaled so that a tall matrix's update RMS matches a square one's.
            p.add_(ortho, alpha=-lr * max(1.0, rows / cols) ** 0.5)

    def _adamw_step(self, group: dict) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            step = float(state["step"])
            grad = p.grad
            state["exp_avg"].lerp_(grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            p.mul_(1 - lr * wd)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))


def _orthogonalise_sharded(update: torch.Tensor, steps: int) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(update, DTensor):
        full = newton_schulz(update.full_tensor(), steps)
        # Every rank computed the same matrix: keep the local shard, no communication.
        return distribute_tensor(full, update.device_mesh, update.placements, src_data_rank=None)
    return newton_schulz(update, steps)


# ---------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    warmup_steps: int
    min_ratio: float  # min_lr / lr

    def factor(self, step: int) -> float:
        """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, cosine to min."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    schedule = Schedule(total_steps=total_steps, warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
                        min_ratio=cfg.min_lr / cfg.lr)
    return LambdaLR(optimizer, schedule.factor)
