"""One training run per run directory at a time.

Rank 0 creates `train.lock` in the run directory (the parent of
checkpoint.dir, which by default also holds the log and the export) with
O_EXCL before the run writes anything, holding its pid, host and start time,
and removes it when the run ends. A second run on the directory is refused
with the owner named. A lock whose owner is gone (same host; the pid has
exited, or now belongs to a process started later) was left by a killed run
and is taken over with a message. A lock from another host cannot be checked
and is always refused: delete it by hand once that run is known to be over.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from common.atomic import file_lock

LOCK_NAME = "train.lock"
_TAKEOVER_GUARD = ".train.lock.takeover"  # serialises removals of a stale lock


@dataclass(frozen=True)
class LockOwner:
    pid: int
    host: str
    started: str  # when the owner took the lock (ISO 8601, UTC), for people
    process_start: int | None  # the pid's start time in clock ticks after boot (Linux): tells a reused pid apart

    @classmethod
    def this_process(cls) -> LockOwner:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return cls(os.getpid(), socket.gethostname(), now, _process_start(os.getpid()))

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, since {self.started}"

    def is_gone(self) -> bool:
        """True only when this host can tell the owner has exited."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            pass
        start = _process_start(self.pid)
        # A zombie has exited; a different start time means the pid was reused.
        return _process_state(self.pid) == "Z" or (None not in (start, self.process_start) and start != self.process_start)


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces), or None off Linux."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _process_state(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def _process_start(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22 of stat, `starttime`


def read_owner(lock: Path) -> LockOwner | None:
    """The lock's owner; None when there is no lock. ValueError for a lock that cannot be read."""
    try:
        text = lock.read_text()
    except FileNotFoundError:
        return None
    try:
        return LockOwner(**json.loads(text))
    except (ValueError, TypeError):
        raise ValueError(f"{lock}: a run lock that cannot be read ({text[:80]!r}); if no run uses this directory, "
                         "delete it") from None


def _try_create(lock: Path, me: LockOwner) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(asdict(me)))
        f.flush()
        os.fsync(f.fileno())
    return True


@dataclass(frozen=True)
class HeldLock:
    run_dir: Path
    owner: LockOwner
    created_dir: bool  # the run directory did not exist before: a run that ends before writing leaves nothing


def acquire(run_dir: Path) -> HeldLock:
    """Takes the run directory's lock (creating the directory); ValueError naming the owner if it is in use."""
    run_dir = Path(run_dir)
    created_dir = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    me = LockOwner.this_process()
    for _ in range(3):  # a takeover can lose the race for the fresh lock to another run
        if _try_create(lock, me):
            return HeldLock(run_dir, me, created_dir)
        owner = read_owner(lock)
        if owner is None:  # released in between
            continue
        if not owner.is_gone():
            raise ValueError(f"{run_dir} is in use by another training run ({owner.describe()}; lock {lock}). "
                             "Wait for it, or choose another checkpoint.dir"
                             + ("" if owner.host == me.host else "; if that run is over, delete the lock"))
        with file_lock(run_dir / _TAKEOVER_GUARD):
            # Only the stale lock just read is removed, never one another run created since.
            if read_owner(lock) == owner:
                lock.unlink()
                print(f"{lock}: taking over the lock of a run that is gone ({owner.describe()})", flush=True)
    raise ValueError(f"{lock}: could not take the run lock (another run keeps taking it)")


def release(held: HeldLock) -> None:
    """Removes the lock if it is still this run's, and the run directory if the run made it and left it empty."""
    lock = held.run_dir / LOCK_NAME
    with contextlib.suppress(ValueError):
        if read_owner(lock) == held.owner:
            lock.unlink()
    if held.created_dir:
        with contextlib.suppress(OSError):  # not empty: the run wrote something
            held.run_dir.rmdir()
