"""Eval broken down by source and by channel (caches with those row columns).

Each valid position falls in one group, (its row's source, the channel of the token it
predicts); the loss returns CE, KL, top-1 agreement and token sums per group from the same
per-position values as its totals, so the groups of one source (or channel) add up to it,
and all sources add up to the overall eval. Shape suffixes: B rows, P positions, G groups.
"""

from __future__ import annotations

import torch

from common.row_columns import CHANNEL_NAMES


def group_layout(num_sources: int, has_channels: bool) -> tuple[int, int]:
    """(sources, channels) the groups span: group = source * channels + channel; 1 where absent."""
    return max(num_sources, 1), len(CHANNEL_NAMES) if has_channels else 1


def group_ids_BP(batch, num_sources: int) -> tuple[torch.Tensor | None, int]:
    """Each position's group and the number of groups; (None, 0) for a batch with neither
    sources (`num_sources` 0) nor channels. Pads get -1 (their labels keep them out)."""
    channels_BP = batch.target_channels_BP()
    sources_BP = batch.target_source_ids_BP() if num_sources > 0 else None
    if channels_BP is None and sources_BP is None:
        return None, 0
    num_s, num_c = group_layout(num_sources, channels_BP is not None)
    groups_BP = torch.zeros_like(batch.labels_BL[:, 1:])
    if sources_BP is not None:
        groups_BP += sources_BP * num_c
    if channels_BP is not None:
        groups_BP += channels_BP
    pad_BP = (channels_BP if channels_BP is not None else sources_BP) < 0
    return groups_BP.masked_fill(pad_BP, -1), num_s * num_c


def breakdown(group_sums_G4: torch.Tensor, source_names: list[str], has_channels: bool, loss_cfg) -> dict:
    """All-reduced group sums -> {"by_source": {name: averages}, "by_channel": {name: averages}}
    (each present when the cache has it; groups without tokens are left out)."""
    num_s, num_c = group_layout(len(source_names), has_channels)
    sums_SC4 = group_sums_G4.double().reshape(num_s, num_c, 4)
    out = {}
    if source_names:
        out["by_source"] = _averages(sums_SC4.sum(1), source_names, loss_cfg)
    if has_channels:
        out["by_channel"] = _averages(sums_SC4.sum(0), list(CHANNEL_NAMES), loss_cfg)
    return out


def _averages(sums_X4: torch.Tensor, names: list[str], loss_cfg) -> dict:
    out = {}
    for name, (ce, kl, agree, tokens) in zip(names, sums_X4.tolist()):
        if tokens > 0:
            parts = {"ce": ce / tokens, "kl": kl / tokens, "top1": agree / tokens, "tokens": int(tokens),
                     "ce_sum": ce, "kl_sum": kl}
            out[name] = {"loss": loss_cfg.objective(parts["ce"], parts["kl"]), **parts}
    return out
