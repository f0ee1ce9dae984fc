"""The teacher's targets as the loss reads them: top-k logits with log-sum-exps, or sampled ids and counts.

Each class lives with its target kind in `common/targets/` and names the cache targets mode it comes
from (`cache_mode`), which is how a divergence says which cache it needs.
"""

from __future__ import annotations

from common.targets.sampled import SampledTargets
from common.targets.topk import TopkTargets

__all__ = ["SampledTargets", "Targets", "TopkTargets", "lse_column"]


def lse_column(temperatures, kl_temperature: float) -> int | None:
    """Which cached log-sum-exp temperature is the KL temperature (None: not cached)."""
    return next((i for i, t in enumerate(temperatures) if abs(t - kl_temperature) < 1e-6), None)


Targets = TopkTargets | SampledTargets
