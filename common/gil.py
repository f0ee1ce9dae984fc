"""A shorter GIL switch interval for processes where one thread drives a device
and helper threads move bytes.

The helper threads (shard writers, loader decoders) hand the GIL back and forth
many times per row, since Arrow, numpy and torch calls release it, while the
driving thread (an in-process vLLM engine, a training loop launching kernels)
is mostly Python. At Python's default 5 ms whichever side waits for the GIL
waits up to a whole interval each time: a convoy. 0.5 ms measured 2.2x faster
shard writes beside a busy Python thread (bench/writer_bench.py --busy-thread).
"""

from __future__ import annotations

import sys

SWITCH_INTERVAL_S = 0.0005


def shorten_switch_interval() -> float:
    """Sets at most `SWITCH_INTERVAL_S`; returns the interval to restore."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, SWITCH_INTERVAL_S))
    return before
