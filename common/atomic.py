"""Atomic file writes: write to a hidden temporary name, fsync, rename, fsync the
directory. A reader never sees a half-written file under its final name."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

TMP_PREFIX = ".tmp-"


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path_for(path: Path) -> Path:
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
    os.close(fd)
    return Path(name)


def publish(tmp: Path, final: Path) -> None:
    """fsync `tmp`, rename it over `final`, fsync the directory."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = tmp_path_for(path)
    try:
        tmp.write_bytes(data)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def file_lock(path: Path):
    """Exclusive advisory lock (several workers share one cache directory)."""
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def remove_stale_tmp(directory: Path, stem: str) -> int:
    """Delete leftovers of killed writers for files named `stem*`."""
    removed = 0
    for p in Path(directory).glob(f"{TMP_PREFIX}{stem}*"):
        p.unlink(missing_ok=True)
        removed += 1
    return removed
