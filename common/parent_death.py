"""Processes that die with the process that started them.

`vpmoe train --nproc-per-node N` starts torchrun's agent, which starts the
ranks in sessions of their own; the ranks may start decode processes, and
`cache-teacher --gpus` starts a worker per GPU. Each of them asks the kernel
for SIGKILL when its parent exits (Linux `prctl(PR_SET_PDEATHSIG)`), so
killing a launcher, with SIGKILL or its whole process group included, ends
every level below it instead of leaving ranks that go on writing into a run
directory the next run uses. Elsewhere these calls do nothing.

The signal follows the parent *thread*: a child must be started from a thread
that lives as long as its process (the main thread everywhere here).
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@functools.cache
def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent(parent_pid: int | None = None) -> None:
    """SIGKILL this process when its parent exits; exits at once if the parent is already gone.

    parent_pid: the process that started this one (default: the parent now). If
    it exited before the request took effect, this process has been re-parented
    and would never get the signal.
    """
    prctl = _prctl()
    if prctl is None:
        return
    expected = os.getppid() if parent_pid is None else parent_pid
    if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != expected:
        os._exit(1)


def dies_with_this_process() -> Callable[[], None] | None:
    """A `preexec_fn` for subprocess: the child gets SIGKILL when this process exits (None off Linux)."""
    if _prctl() is None:
        return None
    me = os.getpid()  # read here: in the child, os.getpid() is the child's own
    return functools.partial(die_with_parent, me)
