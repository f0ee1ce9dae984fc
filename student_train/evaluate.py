"""Evaluation on the eval cache: token-averaged CE and KL, top-1 agreement with
the teacher, and hidden-state cosine, summed on each rank and all-reduced; by
source and by channel where the cache stores them (student_train/eval_groups.py)."""

from __future__ import annotations

import sys

import torch

from common.manifest import CacheManifest, teacher_differences
from common.row_columns import CHANNELS
from student_train.config import DataConfig
from student_train.eval_groups import breakdown, group_layout
from student_train.model import LossSums
from student_train.parallel import DistEnv, all_reduce_sum, print0


def check_eval_teacher(train: CacheManifest, eval_: CacheManifest, data: DataConfig) -> None:
    """Eval targets from another teacher than the train targets measure the wrong
    distance: refused, or a warning with data.allow_teacher_mismatch."""
    differences = teacher_differences(train.teacher, eval_.teacher)
    if not differences:
        return
    message = (f"{data.eval_cache}: made by another teacher than the train cache {data.train_cache} "
               f"({'; '.join(differences)})")
    if not data.allow_teacher_mismatch:
        raise ValueError(f"{message}; set data.allow_teacher_mismatch: true to evaluate on it anyway")
    print0(f"warning: {message}", file=sys.stderr)


def summarise(sums_F: torch.Tensor, loss_cfg) -> dict:
    """All-reduced LossSums.as_tensor() -> averages, and the weighted objective the trainer minimises."""
    s = dict(zip(LossSums.FIELDS, sums_F.tolist()))
    tokens = max(s["valid_tokens"], 1.0)
    out = {"ce": s["ce_sum"] / tokens, "kl": s["kl_sum"] / tokens, "top1": s["top1_agree_sum"] / tokens,
           "tokens": int(s["valid_tokens"])}
    loss = loss_cfg.objective(out["ce"], out["kl"])
    if s["hidden_positions"] > 0:
        dist = s["hidden_dist_sum"] / s["hidden_positions"]
        out["hidden_cos"] = 1.0 - dist
        loss += loss_cfg.hidden_cosine_weight * dist
    out["loss"] = loss
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, env: DistEnv, loss_cfg, autocast) -> dict:
    """One pass over the eval loader's epoch (the same rows every time).

    Every rank runs the same number of batches (the loader pads ranks with
    filler rows), which FSDP's per-layer collectives need.
    """
    was_training = model.training
    model.eval()
    sums_F = torch.zeros(len(LossSums.FIELDS), dtype=torch.float64, device=env.device)
    # By source and channel where the cache has them (student_train/eval_groups.py); the same
    # group count on every rank, since every rank builds the same source table.
    has_channels = CHANNELS in loader.spec.columns
    num_s, num_c = group_layout(len(loader.source_names), has_channels)
    grouped = bool(loader.source_names) or has_channels
    group_sums_G4 = torch.zeros((num_s * num_c if grouped else 0, 4), dtype=torch.float64, device=env.device)
    for batch in loader.epoch_batches():
        batch = batch.to(env.device, non_blocking=True)
        with autocast:
            # Normalisers of 1 make the loss parts plain sums; they are divided after the all-reduce.
            _, sums = model(batch, 1.0, 1.0, num_sources=len(loader.source_names))
        sums_F += sums.as_tensor().to(sums_F.device)
        if sums.group_sums_G4 is not None:
            group_sums_G4 += sums.group_sums_G4.double().to(group_sums_G4.device)
    all_reduce_sum(sums_F)
    model.train(was_training)
    result = summarise(sums_F.cpu(), loss_cfg)
    if grouped:
        all_reduce_sum(group_sums_G4)
        result.update(breakdown(group_sums_G4.cpu(), loader.source_names, has_channels, loss_cfg))
    return result
