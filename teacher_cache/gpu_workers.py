"""`cache-teacher --gpus`: one worker process per GPU of this node.

Each worker is `cache-teacher` itself, run for one worker slot with
`CUDA_VISIBLE_DEVICES` set to its GPU (worker index = node worker * GPUs +
local index); the parent has checked the inputs and printed the plan, then
waits, reporting progress from the sidecars the workers publish. Workers die
with the parent (`parent_death`), so a killed launcher leaves no engine
behind; a rerun resumes from the published shards.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from common.cache_dir import CacheDir
from common.cpu_share import with_cpu_share
from common.parent_death import dies_with_this_process
from teacher_cache.pipeline import ProgressView, RunSummary
from teacher_cache.plan import ShardPlan, WorkerSlot, node_local_worker, shards_for_worker

if TYPE_CHECKING:
    from teacher_cache.cache_run import CacheConfig

POLL_S = 1.0


def check_gpus(gpus: tuple[int, ...]) -> None:
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus lists a GPU twice: {gpus}")


def run_gpu_workers(cfg: CacheConfig, plan: list[ShardPlan], node: WorkerSlot) -> RunSummary:
    """Spawn one worker per GPU in `cfg.gpus`, wait for all, and sum up what they wrote."""
    out = CacheDir(cfg.out)
    slots = [node_local_worker(node, local, len(cfg.gpus)) for local in range(len(cfg.gpus))]
    node_shards = {s.index for slot in slots for s in shards_for_worker(plan, slot)}
    before = {e.index for e in out.sidecars()} if out.path.is_dir() else set()
    start = time.monotonic()
    procs = [(gpu, _spawn(cfg, gpu, slot)) for gpu, slot in zip(cfg.gpus, slots)]
    total_rows = sum(s.num_rows for s in plan if s.index in node_shards)
    progress = ProgressView(total_rows, enabled=cfg.writer.show_progress and not cfg.quiet, description="caching (node)")
    try:
        while any(p.poll() is None for _, p in procs):
            _report_sidecars(out, node_shards, progress)
            time.sleep(POLL_S)
        _report_sidecars(out, node_shards, progress)
    finally:
        progress.close()
        _stop(procs)  # only on an error here: otherwise every worker has ended
    failed = [(gpu, p.returncode) for gpu, p in procs if p.returncode != 0]
    if failed:
        raise RuntimeError("worker(s) failed: " + ", ".join(f"GPU {g} exit code {rc}" for g, rc in failed)
                           + "; rerun the same command to resume")
    written = [e for e in out.sidecars() if e.index in node_shards and e.index not in before]
    return RunSummary(shards=len(written), rows=sum(e.rows for e in written), tokens=sum(e.tokens for e in written),
                      bytes=sum(e.bytes for e in written), shards_skipped=len(node_shards & before),
                      seconds=time.monotonic() - start, num_gpus=len(cfg.gpus), gpu_hour_price=cfg.gpu_hour_price)


def _stop(procs: list[tuple[int, subprocess.Popen]], grace_s: float = 10.0) -> None:
    """Workers still running: terminated, then killed after `grace_s` (their death signal only
    fires when this whole process dies, not when its loop raises)."""
    running = [p for _, p in procs if p.poll() is None]
    for p in running:
        p.terminate()
    for p in running:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _spawn(cfg: CacheConfig, gpu: int, slot: WorkerSlot) -> subprocess.Popen:
    child = dataclasses.replace(cfg, gpus=(), num_workers=slot.count, worker_index=slot.index, quiet=True,
                                writer=dataclasses.replace(cfg.writer, show_progress=False),
                                teacher=dataclasses.replace(cfg.teacher, device="auto"))
    return subprocess.Popen([sys.executable, "-m", "teacher_cache.gpu_workers", child.to_json()],
                            env=worker_env(os.environ, gpu, len(cfg.gpus)), preexec_fn=dies_with_this_process())


def worker_env(base: Mapping[str, str], gpu: int, num_gpus: int) -> dict[str, str]:
    """A worker's environment: its one GPU and its share of the host's cores."""
    return with_cpu_share({**base, "CUDA_VISIBLE_DEVICES": str(gpu)}, num_gpus)


def _report_sidecars(out: CacheDir, node_shards: set[int], progress: ProgressView) -> None:
    if not out.path.is_dir():
        return
    done = [e for e in out.sidecars() if e.index in node_shards]
    progress.set_totals(rows=sum(e.rows for e in done), tokens=sum(e.tokens for e in done),
                        bytes_=sum(e.bytes for e in done))


def _worker_main(argv: list[str]) -> int:
    """Entry point of a per-GPU worker process."""
    # Imported here: cache_run imports this module to launch workers.
    from teacher_cache.cache_run import CacheConfig, run_cache

    cfg = CacheConfig.from_json(argv[0])
    try:
        run_cache(cfg)
    except (ValueError, RuntimeError, OSError) as exc:  # as the CLI reports them
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
