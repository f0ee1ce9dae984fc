"""The run-directory lock: one run at a time, the owner named, a dead owner's lock taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict, replace

import pytest

from student_train import run_lock
from student_train.run_lock import LOCK_NAME, LockOwner, acquire, read_owner, release


def write_lock(run_dir, owner: LockOwner) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps(asdict(owner)))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_lock_refuses_a_second_run_and_names_the_owner(tmp_path):
    run = tmp_path / "run"
    held = acquire(run)
    owner = read_owner(run / LOCK_NAME)
    assert (owner.pid, owner.host) == (os.getpid(), socket.gethostname()) and owner.started
    with pytest.raises(ValueError) as err:
        acquire(run)
    assert str(err.value).startswith(f"{run} is in use by another training run (pid {os.getpid()} on host "
                                     f"{socket.gethostname()}, since {owner.started}; lock {run}/{LOCK_NAME})")
    release(held)
    assert not (run / LOCK_NAME).exists()
    release(acquire(run))  # free again


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_message(tmp_path, capsys):
    run = tmp_path / "run"
    stale = LockOwner(dead_pid(), socket.gethostname(), "2026-01-01T00:00:00+00:00", None)
    write_lock(run, stale)
    held = acquire(run)
    assert f"taking over the lock of a run that is gone (pid {stale.pid} on host" in capsys.readouterr().out
    assert read_owner(run / LOCK_NAME) == held.owner
    release(held)


def test_a_reused_pid_is_told_apart_by_its_start_time(tmp_path):
    run = tmp_path / "run"
    me = LockOwner.this_process()
    if me.process_start is None:
        pytest.skip("no /proc: process start times are unknown")
    write_lock(run, replace(me, process_start=me.process_start - 1))  # this pid, an earlier process
    release(acquire(run))


def test_a_lock_from_another_host_is_refused(tmp_path):
    run = tmp_path / "run"
    write_lock(run, LockOwner(dead_pid(), "some-other-host", "2026-01-01T00:00:00+00:00", None))
    with pytest.raises(ValueError, match=r"pid \d+ on host some-other-host.*if that run is over, delete the lock"):
        acquire(run)


def test_an_unreadable_lock_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text("")
    with pytest.raises(ValueError, match="a run lock that cannot be read"):
        acquire(run)


def test_a_run_that_wrote_nothing_leaves_no_directory(tmp_path):
    release(acquire(tmp_path / "new"))
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    release(acquire(tmp_path / "kept"))
    assert (tmp_path / "kept").is_dir()  # it was there before


def test_the_lock_file_is_created_exclusively(tmp_path, monkeypatch):
    """Two runs that both find no lock: only one create succeeds, the other sees the winner's lock."""
    run = tmp_path / "run"
    run.mkdir()
    real_create = run_lock._try_create

    def racing_create(lock, me):
        if not lock.exists():  # another run gets there between our check and our create
            write_lock(run, replace(me, pid=os.getppid(), process_start=None))
        return real_create(lock, me)

    monkeypatch.setattr(run_lock, "_try_create", racing_create)
    with pytest.raises(ValueError, match=rf"pid {os.getppid()} on host"):
        acquire(run)
