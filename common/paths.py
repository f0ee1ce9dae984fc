"""Whether two paths overlap: the same place, or one inside the other.

Both are made absolute and their symlinks resolved (as far as they exist), so
`runs/x` and a link to it are one place. A command refuses outputs that
overlap each other or its inputs before it does any work: an export replaces
its directory wholesale, checkpoint rotation deletes directories, and a cache
written into its own source would be read back as data.
"""

from __future__ import annotations

from pathlib import Path


def resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def is_within(path: str | Path, outer: str | Path) -> bool:
    """`path` is `outer` or lies somewhere below it."""
    inner_abs, outer_abs = resolved(path), resolved(outer)
    return inner_abs == outer_abs or outer_abs in inner_abs.parents


def overlap(a: str | Path, b: str | Path) -> bool:
    return is_within(a, b) or is_within(b, a)


def overlap_error(a_name: str, a: str | Path, b_name: str, b: str | Path, why: str) -> ValueError:
    """The one-line refusal naming both paths, as given and as resolved when that differs."""
    def shown(path) -> str:
        return str(path) if Path(path).expanduser().absolute() == resolved(path) else f"{path} (= {resolved(path)})"

    relation = "is the same path as" if resolved(a) == resolved(b) else (
        "lies inside" if is_within(a, b) else "contains")
    return ValueError(f"{a_name} {shown(a)} {relation} {b_name} {shown(b)}: {why}")
