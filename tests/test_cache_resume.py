"""Resume and scale-out of cache-teacher: a run killed with SIGKILL and resumed
writes the same bytes as a straight run; corrupted shards are recomputed;
worker partitions (separate or shared directories, --gpus, --merge) cover
every row exactly once and give the same shards as one worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.manifest import load_manifest, shard_file_name
from demo.tiny_models import build_model, save_model, tiny_llama_config
from teacher_cache.cache_run import merge_caches
from teacher_cache.plan import WorkerSlot, node_local_worker, plan_shards, resolve_worker, shards_for_worker
from test_cache_teacher import VOCAB, cache, random_rows, shard_bytes, write_parquet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    save_model(build_model(tiny_llama_config(VOCAB, hidden_size=128, intermediate_size=256), seed=2), root / "model")
    big = write_parquet(root / "big.parquet", random_rows(0, 40, 150, 250))
    small = write_parquet(root / "small.parquet", random_rows(1, 23, 5, 40))
    return root / "model", big, small


@pytest.fixture(scope="module", autouse=True)
def one_thread_workers(one_thread):
    # Runs compared byte for byte use one thread, as do the worker subprocesses.
    env_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    if env_before is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env_before


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", "cache-teacher", *args]


def _assert_covers_rows_once(cache_dir: Path, num_rows: int) -> None:
    manifest = load_manifest(cache_dir)
    ranges = sorted((e.row_start, e.row_end) for e in manifest.shards)
    covered = [r for start, end in ranges for r in range(start, end)]
    assert covered == list(range(num_rows))
    assert manifest.total_rows == num_rows


def test_kill_9_mid_run_then_resume_equals_straight_run(setup, tmp_path):
    model_dir, data, _ = setup
    args = ["--model", str(model_dir), "--data", str(data), "--top-k", "16", "--hidden-layers", "2",
            "--rows-per-shard", "4", "--no-progress"]
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(_cli(*args, "--out", str(out)), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_sidecar = out / (shard_file_name(0) + ".json")
    deadline = time.monotonic() + 120
    while not first_sidecar.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no shard written in time"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in out.glob("shard-*.arrow.json"))
    assert 1 <= len(finished) < 10, "the kill must land mid-run"
    kept_stat = (out / shard_file_name(0)).stat()
    # What else a kill can leave: a writer's temporary file, a shard published without its sidecar.
    (out / f".tmp-{shard_file_name(8)}.abc123").write_bytes(b"half a shard")
    (out / shard_file_name(9)).write_bytes(b"published, sidecar never written")

    summary = cache(model_dir, data, out, top_k=16, hidden_layers=(2,), rows_per_shard=4)
    assert summary.shards_skipped == len(finished) and summary.shards == 10 - len(finished)
    after = (out / shard_file_name(0)).stat()
    assert (after.st_ino, after.st_mtime_ns) == (kept_stat.st_ino, kept_stat.st_mtime_ns), "finished shard kept"
    assert not list(out.glob(".tmp-*"))

    cache(model_dir, data, tmp_path / "straight", top_k=16, hidden_layers=(2,), rows_per_shard=4)
    straight = shard_bytes(tmp_path / "straight")
    assert len(straight) == 10 and shard_bytes(out) == straight
    _assert_covers_rows_once(out, 40)


def test_corrupted_or_unsidecarred_shards_are_recomputed(setup, tmp_path):
    model_dir, _, data = setup
    out = tmp_path / "c"
    cache(model_dir, data, out, top_k=8, rows_per_shard=5)
    original = shard_bytes(out)
    blob = bytearray(original[shard_file_name(1)])
    blob[len(blob) // 2] ^= 0x01  # same size, different sha256
    (out / shard_file_name(1)).write_bytes(bytes(blob))
    (out / (shard_file_name(3) + ".json")).unlink()
    summary = cache(model_dir, data, out, top_k=8, rows_per_shard=5)
    assert summary.shards == 2 and summary.shards_skipped == len(original) - 2
    assert shard_bytes(out) == original


def test_worker_partitions_cover_every_row_once_and_merge_to_the_single_worker_cache(setup, tmp_path):
    model_dir, _, data = setup
    kw = dict(top_k=8, rows_per_shard=3)
    cache(model_dir, data, tmp_path / "single", **kw)
    reference = shard_bytes(tmp_path / "single")
    assert len(reference) == 8  # 23 rows, 3 per shard
    for workers in (2, 3):
        dirs = [tmp_path / f"w{workers}_{i}" for i in range(workers)]
        for i, d in enumerate(dirs):
            cache(model_dir, data, d, num_workers=workers, worker_index=i, **kw)
            assert {e.index for e in load_manifest(d).shards} == {s for s in range(8) if s % workers == i}
        merged = tmp_path / f"merged{workers}"
        report = merge_caches(merged, dirs)
        assert report.shards_added == 8 and report.missing == []
        _assert_covers_rows_once(merged, 23)
        assert shard_bytes(merged) == reference
    # Several workers sharing one directory need no merge.
    shared = tmp_path / "shared"
    for i in range(3):
        cache(model_dir, data, shared, num_workers=3, worker_index=i, **kw)
    _assert_covers_rows_once(shared, 23)
    assert shard_bytes(shared) == reference
    # A partial merge says what is missing.
    report = merge_caches(tmp_path / "partial", [tmp_path / "w3_0", tmp_path / "w3_2"])
    assert report.missing == [1, 4, 7]


def test_merge_refuses_overlapping_shards_and_different_caches(setup, tmp_path):
    model_dir, _, data = setup
    cache(model_dir, data, tmp_path / "a", top_k=8, rows_per_shard=3, num_workers=2, worker_index=0)
    cache(model_dir, data, tmp_path / "b", top_k=8, rows_per_shard=3, num_workers=2, worker_index=0)
    cache(model_dir, data, tmp_path / "k4", top_k=4, rows_per_shard=3, num_workers=2, worker_index=1)
    with pytest.raises(ValueError, match="shard 0 is in both"):
        merge_caches(tmp_path / "m1", [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ValueError, match="k4.*targets/hidden spec"):
        merge_caches(tmp_path / "m2", [tmp_path / "a", tmp_path / "k4"])
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()

    from cli.main import app

    result = CliRunner().invoke(app, ["cache-teacher", "--out", str(tmp_path / "m3"), "--merge", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "4 shard(s) added" in result.output and "missing shard(s) 1, 3, 5, 7" in result.output


def test_gpus_spawn_one_worker_per_device_and_match_the_single_worker_cache(setup, tmp_path):
    """--gpus 0,1 on a CPU machine: two worker processes (CUDA_VISIBLE_DEVICES 0 and 1)
    as node worker 1 of 2, so global workers 2 and 3 of 4."""
    model_dir, _, data = setup
    kw = dict(top_k=8, rows_per_shard=3)
    cache(model_dir, data, tmp_path / "single", **kw)
    summary = cache(model_dir, data, tmp_path / "node1", gpus=(0, 1), num_workers=2, worker_index=1, **kw)
    expected = {shard_file_name(s) for s in range(8) if s % 4 in (2, 3)}
    got = shard_bytes(tmp_path / "node1")
    assert set(got) == expected and summary.shards == len(expected)
    assert got == {name: blob for name, blob in shard_bytes(tmp_path / "single").items() if name in expected}


def test_worker_slot_from_arguments_torchrun_or_slurm():
    assert resolve_worker(3, 1, env={"RANK": "0", "WORLD_SIZE": "2"}) == WorkerSlot(1, 3)
    assert resolve_worker(None, None, env={"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "5",
                                           "SLURM_NTASKS": "8"}) == WorkerSlot(1, 2)
    assert resolve_worker(None, None, env={"SLURM_PROCID": "5", "SLURM_NTASKS": "8"}) == WorkerSlot(5, 8)
    assert resolve_worker(None, None, env={}) == WorkerSlot(0, 1)
    with pytest.raises(ValueError, match="go together"):
        resolve_worker(2, None, env={})
    with pytest.raises(ValueError, match="not in"):
        resolve_worker(None, None, env={"RANK": "4", "WORLD_SIZE": "4"})
    assert node_local_worker(WorkerSlot(1, 2), 3, 4) == WorkerSlot(7, 8)
    plan = plan_shards(23, 3)
    assert [(s.row_start, s.row_end) for s in plan][-1] == (21, 23)
    for count in (1, 2, 3, 5):
        owned = sorted(s.index for i in range(count) for s in shards_for_worker(plan, WorkerSlot(i, count)))
        assert owned == list(range(len(plan)))


def test_automatic_shard_size_resumes_the_cache_in_out_whatever_size_it_used(setup, tmp_path):
    model_dir, _, data = setup
    out = tmp_path / "auto"
    cache(model_dir, data, out, top_k=8, rows_per_shard=5)
    original = shard_bytes(out)
    (out / (shard_file_name(2) + ".json")).unlink()  # one shard left to do
    # No size given (0 = automatic): the cache's own 5 rows per shard, not a fresh choice, so
    # the run resumes instead of refusing a changed layout.
    summary = cache(model_dir, data, out, top_k=8, rows_per_shard=0)
    assert summary.shards == 1 and summary.shards_skipped == len(original) - 1
    assert shard_bytes(out) == original
    assert load_manifest(out).work["rows_per_shard"] == 5
    # A new cache gets the automatic size, recorded in its manifest.
    fresh = tmp_path / "fresh"
    cache(model_dir, data, fresh, top_k=8, rows_per_shard=0)
    assert load_manifest(fresh).work["rows_per_shard"] == 256  # targets-only rows are small: the row cap


def test_workers_still_running_when_the_launcher_fails_are_stopped():
    from teacher_cache.gpu_workers import _stop

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ignoring = subprocess.Popen([sys.executable, "-c",
                                 "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                 "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert ignoring.stdout.readline().strip() == "ready"
    _stop([(0, sleeper), (1, ignoring)], grace_s=1.0)
    assert sleeper.returncode == -signal.SIGTERM and ignoring.returncode == -signal.SIGKILL



def test_each_gpu_worker_gets_its_gpu_and_a_share_of_the_cores_unless_the_user_set_them():
    from teacher_cache.gpu_workers import worker_env

    cores = os.cpu_count() or 1
    env = worker_env({"PATH": "/bin"}, gpu=3, num_gpus=2)
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "3", "OMP_NUM_THREADS": str(max(1, cores // 2))}
    assert worker_env({}, gpu=0, num_gpus=10 * cores)["OMP_NUM_THREADS"] == "1"
    assert worker_env({"OMP_NUM_THREADS": "7"}, gpu=1, num_gpus=2)["OMP_NUM_THREADS"] == "7"
