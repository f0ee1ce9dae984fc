"""Run a command and watch it: each output line with the second it arrived, the
peak memory of its whole process tree, the peak device memory, and a kill of
the whole tree when a condition holds (a preemption).

The tree is followed through parent ids, not the process group: `vpmoe train
--nproc-per-node N` starts torch.distributed.run, which starts each rank in a
session of its own, so a signal to the launcher's process group never reaches
the ranks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.parent_death import dies_with_this_process

MEMORY_POLL_S = 0.5
KILL_POLL_S = 0.05


@dataclass
class Watched:
    command: list[str]
    returncode: int
    started_at: float  # wall clock (time.time()) when the process started
    seconds: float
    lines: list[tuple[float, str]] = field(default_factory=list)  # (seconds since start, line)
    peak_host_gib: float = 0.0  # sum of the tree's proportional set sizes, sampled
    peak_device_gib: float | None = None  # the fullest GPU's memory in use (nvidia-smi), sampled
    killed_at_s: float | None = None

    def first(self, prefix: str) -> tuple[float, str] | None:
        """The first line starting with `prefix`, with its arrival second."""
        return next(((t, line) for t, line in self.lines if line.startswith(prefix)), None)

    def gap_before(self, prefix: str) -> list[float]:
        """Seconds between each line starting with `prefix` and the line before it."""
        return [t - self.lines[i - 1][0] for i, (t, line) in enumerate(self.lines) if i and line.startswith(prefix)]

    def tail(self, n: int = 40) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


# ---------------------------------------------------------------- the process tree


def _parent_ids() -> dict[int, int]:
    parents = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # Fields after the command name, which may hold spaces and parentheses.
        parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    return parents


def process_tree(root: int) -> list[int]:
    """`root` and every process descending from it."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parent_ids().items():
        children.setdefault(parent, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _proportional_bytes(pid: int) -> int:
    """PSS (shared pages split between their users, so a sum over processes counts them once)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def tree_memory_gib(root: int) -> float:
    return sum(_proportional_bytes(pid) for pid in process_tree(root)) / 2**30


def device_memory_gib() -> float | None:
    """Memory in use on the fullest visible GPU, or None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used_mib = [float(v) for v in out.split() if v.strip()]
    return max(used_mib) / 1024 if used_mib else None


def kill_tree(root: int) -> list[int]:
    """SIGKILL to `root` and all its descendants, listed before the first signal is sent."""
    tree = process_tree(root)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tree


# ---------------------------------------------------------------- running


def _read_lines(stream, lines: list, start: float, log_file, echo: bool) -> None:
    for raw in stream:
        line = raw.rstrip("\n")
        lines.append((time.perf_counter() - start, line))
        log_file.write(raw)
        log_file.flush()
        if echo:
            print(f"    {line}", flush=True)


def run_watched(command: list[str], log_path: Path, env: dict | None = None, cwd: Path | None = None,
                kill_when: Callable[[], bool] | None = None, watch_device: bool = False,
                echo: bool = False) -> Watched:
    """Runs `command` to its end (or until `kill_when()` is true, then kills its tree)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:
        log_file.write("$ " + " ".join(command) + "\n")
        started_at, start = time.time(), time.perf_counter()
        # The command dies with this process; an error here kills its whole tree (finally, below).
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=env, cwd=cwd, preexec_fn=dies_with_this_process())
        watched = Watched(command, 0, started_at, 0.0)
        reader = threading.Thread(target=_read_lines, args=(proc.stdout, watched.lines, start, log_file, echo),
                                  daemon=True)
        reader.start()
        next_sample = 0.0
        try:
            while proc.poll() is None:
                now = time.perf_counter() - start
                if now >= next_sample:
                    _sample_memory(watched, proc.pid, watch_device)
                    next_sample = now + MEMORY_POLL_S
                if kill_when is not None and watched.killed_at_s is None and kill_when():
                    kill_tree(proc.pid)
                    watched.killed_at_s = time.perf_counter() - start
                time.sleep(KILL_POLL_S if kill_when is not None else 0.2)
        finally:
            if proc.poll() is None:  # an exception or interrupt here: nothing of the command runs on
                kill_tree(proc.pid)
                proc.wait()
        watched.seconds = time.perf_counter() - start
        watched.returncode = proc.returncode
        reader.join(timeout=30)
    return watched


def _sample_memory(watched: Watched, root: int, watch_device: bool) -> None:
    watched.peak_host_gib = max(watched.peak_host_gib, tree_memory_gib(root))
    if watch_device:
        used = device_memory_gib()
        if used is not None:
            watched.peak_device_gib = max(watched.peak_device_gib or 0.0, used)
