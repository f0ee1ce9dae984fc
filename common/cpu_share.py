"""The environment of one of N local child processes (training ranks, per-GPU capture workers):
an equal share of the host's cores for torch's CPU thread pool, unless the user set it. N children
each starting a team of every core would contend for them with their own loader and writer threads."""

from __future__ import annotations

import os
from collections.abc import Mapping


def with_cpu_share(env: Mapping[str, str], processes: int) -> dict[str, str]:
    shared = dict(env)
    shared.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, processes))))
    return shared
