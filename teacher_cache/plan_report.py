"""What `cache-teacher` prints before any model work (and alone with --dry-run):
the teacher, the source, the targets, each worker's share of the shards, the
storage estimate and the free space at --out."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from teacher_cache.plan import WorkerSlot, estimate_storage, node_local_worker, shards_for_worker

if TYPE_CHECKING:
    from teacher_cache.cache_run import CacheConfig, Prepared


def _format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def plan_report(cfg: CacheConfig, prep: Prepared, worker: WorkerSlot, workers_per_node: int = 1) -> list[str]:
    """The plan and storage estimate, printed before any model work (and alone by --dry-run)."""
    spec = prep.spec
    lengths = prep.source.lengths_R
    tokens = int(lengths.sum())
    estimate = estimate_storage(spec, tokens)
    t = spec.targets
    targets = t.kind.describe(t)
    lines = [
        f"teacher {cfg.teacher.model} ({prep.info.model_type}, {prep.info.num_layers} layers, hidden {prep.info.hidden_size}, "
        f"vocab {prep.info.vocab_size}), backend {prep.backend}",
        f"source {prep.source.path} split '{prep.source.split}': {prep.source.num_rows:,} rows, {tokens:,} tokens",
        f"targets: {targets}",
    ]
    if prep.source.num_rows == 0:
        why = ("--limit-rows 0 selects none of its rows" if prep.source.total_rows
               else f"split '{prep.source.split}' has no rows")
        lines.append(f"WARNING: {prep.source.path}: {why}; the cache will hold no shards and `vpmoe train` "
                     "refuses it")
    if spec.hidden.layers:
        lines.append(f"hidden layers {list(spec.hidden.layers)} in {spec.hidden.dtype}, "
                     f"token fraction {spec.hidden.token_fraction:g}")
    lines.append(f"{len(prep.plan)} shard(s) of {cfg.rows_per_shard} rows")
    for local in range(workers_per_node):
        slot = node_local_worker(worker, local, workers_per_node) if workers_per_node > 1 else worker
        mine = shards_for_worker(prep.plan, slot)
        rows = sum(s.num_rows for s in mine)
        mine_tokens = sum(int(lengths[s.row_start:s.row_end].sum()) for s in mine)
        gpu = f" (GPU {cfg.gpus[local]})" if cfg.gpus else ""
        lines.append(f"worker {slot.index}/{slot.count}{gpu}: {len(mine)} shard(s), {rows:,} rows, "
                     f"{mine_tokens:,} tokens")
    lines.append(f"estimated storage: {_format_bytes(estimate.total_bytes)} "
                 f"({estimate.bytes_per_token:,.1f} bytes/token: targets and tokens "
                 f"{estimate.target_bytes_per_token:,.1f}"
                 + (f", hidden {estimate.hidden_bytes_per_token_per_layer:,.1f} per layer" if spec.hidden.layers else "")
                 + ")")
    free = _free_bytes(Path(cfg.out).resolve())
    lines.append(f"free space at {cfg.out}: {_format_bytes(free)}"
                 + (" -- WARNING: less than the estimate" if free < estimate.total_bytes else ""))
    return lines


def print_lines(console: Console, lines: list[str]) -> None:
    for line in lines:
        console.print(line, highlight=False, markup=False, soft_wrap=True)
