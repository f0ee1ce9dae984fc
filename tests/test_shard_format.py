"""Shard format: every column round-trips within its stated bound, bad input
is refused with a one-line error naming the file, and a killed writer leaves
no visible partial shard.

References are float64 and come from peaked teacher distributions
(demo/peaked_teacher.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from common import codec
from common.cache_dir import CacheDir
from common.manifest import MANIFEST_NAME, load_manifest, resolve_inside, shard_file_name
from common.shard_format import ShardFormatError
from common.shard_reader import ShardReader
from common.spec import HiddenSpec, ShardSpec, TargetSpec, content_hash, hidden_positions
from demo.peaked_teacher import hidden_like, topk_tail_kl
from peaked import rewrite_shard, teacher_row, write_cache
from synthetic_cache import write_cache_rows

REPO = Path(__file__).resolve().parents[1]
BIG_V = 201_088  # the teacher's padded vocabulary: 18-bit ids
SMALL_V = 5_000


def read_all(path: Path):
    with ShardReader(path) as reader:
        return list(reader.iter_rows(verify_content=True))


# ---------------------------------------------------------------- round trips

@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory):
    spec = ShardSpec(vocab_size=BIG_V, targets=TargetSpec(mode="topk", k=64, temperatures=(1.0, 2.0)))
    cache = tmp_path_factory.mktemp("topk")
    # A one-token row has no target positions; it must survive too.
    truths = write_cache(cache, spec, [[97, 1, 160]], batch_rows=2)
    return cache, spec, truths


def test_topk_round_trip_ids_exact_values_within_bound(topk_cache):
    cache, spec, truths = topk_cache
    rows = read_all(cache / shard_file_name(0))
    assert [r.row_id for r in rows] == sorted(truths)
    assert spec.id_bytes == 3
    for row in rows:
        truth = truths[row.row_id]
        np.testing.assert_array_equal(row.input_ids_L, truth.row.input_ids_L)
        np.testing.assert_array_equal(row.labels_L, truth.row.labels_L)
        assert row.content_hash == content_hash(truth.row.input_ids_L)
        num_pos = row.num_positions
        assert row.targets.ids_PK.shape == (num_pos, spec.targets.k)
        # ids exact (stored sorted ascending per position)
        np.testing.assert_array_equal(row.targets.ids_PK, np.sort(truth.row.targets.ids_PK, axis=1))
        # lse is stored as float32 bits: exact.
        np.testing.assert_array_equal(row.targets.lse_PT, truth.row.targets.lse_PT)
        if not num_pos:
            continue
        true_PK = np.take_along_axis(truth.logits_PV, row.targets.ids_PK, axis=1).astype(np.float64)
        max_P = truth.logits_PV.max(axis=1).astype(np.float64)
        gap_PK = max_P[:, None] - true_PK
        bound_PK = codec.value_error_bound(gap_PK, spec.targets.value_scale)
        # float32 arithmetic on logits near 25 adds a few ulps.
        ulps_P = 4 * np.spacing(np.abs(max_P).astype(np.float32)).astype(np.float64)
        err_PK = np.abs(row.targets.logits_PK.astype(np.float64) - true_PK)
        assert (err_PK <= bound_PK + ulps_P[:, None]).all(), float((err_PK - bound_PK).max())
        # The top-1 gap is 0 and decodes exactly.
        np.testing.assert_array_equal(row.targets.logits_PK.max(axis=1), truth.row.targets.logits_PK.max(axis=1))


def test_target_t_predicts_token_t_plus_1(topk_cache):
    cache, _, truths = topk_cache
    for row in read_all(cache / shard_file_name(0)):
        if not row.num_positions:
            continue
        top1_P = row.targets.ids_PK[np.arange(row.num_positions), row.targets.logits_PK.argmax(axis=1)]
        # The rows were built greedily: token t+1 is the teacher's top-1 at t.
        np.testing.assert_array_equal(top1_P, row.input_ids_L[1:])
        # ... and position t is not token t's own distribution shifted in.
        assert (top1_P != row.input_ids_L[:-1]).mean() > 0.5


def test_topk_mean_kl_with_tail_bucket_below_1e4(topk_cache):
    cache, spec, truths = topk_cache
    kls = {t: [] for t in spec.targets.temperatures}
    for row in read_all(cache / shard_file_name(0)):
        truth = truths[row.row_id]
        if not row.num_positions:
            continue
        true_PK = np.take_along_axis(truth.logits_PV, row.targets.ids_PK, axis=1)
        for ti, t in enumerate(spec.targets.temperatures):
            kls[t].append(topk_tail_kl(true_PK, truth.lse_PT[:, ti], row.targets.logits_PK, row.targets.lse_PT[:, ti], t))
    for t, parts in kls.items():
        kl = np.concatenate(parts)
        assert (kl > -1e-12).all()
        assert kl.mean() < 1e-4, (t, kl.mean())
        # Quantisation does lose something: the test would see a broken codec.
        assert kl.mean() > 1e-9


def test_value_bound_is_tight_and_clamps_far_tail():
    scale = codec.DEFAULT_VALUE_SCALE
    gap = np.linspace(0.0, 25.0, 20001)
    decoded = codec.decode_values(codec.encode_values(gap, scale), scale).astype(np.float64)
    bound = codec.value_error_bound(gap, scale)
    err = np.abs(decoded - gap)
    assert (err <= bound + 1e-6).all()
    # The bound is attained (to within the grid spacing) for unclamped codes.
    near = gap < scale * np.log(2 * codec.VALUE_LEVELS)
    assert (bound[near] - err[near]).min() < 1e-3
    # gap_upper_bound never undercuts the true gap behind a decoded value.
    assert (codec.gap_upper_bound(decoded, scale) >= gap - 1e-6).all()


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_hidden_states_within_dtype_bound(tmp_path, dtype):
    dim, length = 96, 41
    spec = ShardSpec(vocab_size=SMALL_V, targets=TargetSpec(k=4),
                     hidden=HiddenSpec(layers=(1, 3), dtype=dtype, hidden_size=dim))
    truth = teacher_row(spec, 0, length, seed=1)
    full = {layer: hidden_like(length, dim, seed=10 + layer) for layer in (1, 3)}
    truth.row.hidden = dict(full)
    write_cache_rows(tmp_path, spec, [[truth.row]])
    [row] = read_all(tmp_path / shard_file_name(0))
    np.testing.assert_array_equal(row.hidden_positions_H, np.arange(length))
    for layer, ref_LD in full.items():
        err = (row.hidden[layer].double() - ref_LD.double()).abs()
        assert (err <= codec.hidden_error_bound(ref_LD, dtype)).all()
        assert err.max() > 0  # lossy, so a decoder returning its input would not pass unnoticed
        rel = (err.norm() / ref_LD.double().norm()).item()
        assert rel < (0.005 if dtype == "bf16" else 0.05)


def test_hidden_token_fraction_stores_the_deterministic_subset(tmp_path):
    dim, length = 32, 57
    spec = ShardSpec(vocab_size=SMALL_V, targets=TargetSpec(k=4),
                     hidden=HiddenSpec(layers=(2,), dtype="fp8", token_fraction=0.25, hidden_size=dim, seed=5))
    rows, full = [], {}
    for row_id in (3, 4):
        truth = teacher_row(spec, row_id, length, seed=2)
        full[row_id] = hidden_like(length, dim, seed=row_id)
        truth.row.hidden_positions_H = hidden_positions(row_id, length, 0.25, 5)
        truth.row.hidden = {2: full[row_id][torch.from_numpy(truth.row.hidden_positions_H).long()]}
        rows.append(truth.row)
    write_cache_rows(tmp_path, spec, [rows])
    decoded = read_all(tmp_path / shard_file_name(0))
    assert not np.array_equal(decoded[0].hidden_positions_H, decoded[1].hidden_positions_H)
    for row in decoded:
        positions = row.hidden_positions_H
        assert len(positions) == round(0.25 * length)
        assert (np.diff(positions) > 0).all() and positions.max() < length
        np.testing.assert_array_equal(positions, hidden_positions(row.row_id, length, 0.25, 5))
        ref_HD = full[row.row_id][torch.from_numpy(positions.copy()).long()]
        assert ((row.hidden[2].double() - ref_HD.double()).abs() <= codec.hidden_error_bound(ref_HD, "fp8")).all()


def test_sampled_round_trip_is_lossless(tmp_path):
    spec = ShardSpec(vocab_size=BIG_V, targets=TargetSpec(mode="sampled", num_samples=50, seed=9))
    truths = write_cache(tmp_path, spec, [[65, 30]])
    for row in read_all(tmp_path / shard_file_name(0)):
        truth = truths[row.row_id].row
        np.testing.assert_array_equal(row.targets.sizes_P, truth.targets.sizes_P)
        np.testing.assert_array_equal(row.targets.ids_S, truth.targets.ids_S)
        np.testing.assert_array_equal(row.targets.counts_S, truth.targets.counts_S)
        group_S = np.repeat(np.arange(row.num_positions), row.targets.sizes_P)
        np.testing.assert_array_equal(np.bincount(group_S, weights=row.targets.counts_S), 50)
        # About 12 distinct ids from 50 draws of a peaked distribution.
        assert 2 < row.targets.sizes_P.mean() < 25
        # Target t describes token t+1 (the greedy next token is drawn with p >= 0.2).
        hit = row.targets.ids_S == row.input_ids_L[1:][group_S]
        np.testing.assert_array_equal(np.bincount(group_S[hit], minlength=row.num_positions), 1)


# ---------------------------------------------------------------- bad input through the reader

@pytest.fixture()
def small_cache(tmp_path):
    spec = ShardSpec(vocab_size=SMALL_V, targets=TargetSpec(k=8))
    write_cache(tmp_path / "cache", spec, [[30, 20], [25]])
    return tmp_path / "cache", spec


def test_truncated_shard_names_the_file(small_cache):
    cache, _ = small_cache
    path = cache / shard_file_name(1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    entry = load_manifest(cache).shards[1]
    with pytest.raises(ShardFormatError, match=rf"{path}: .*bytes on disk, manifest says {len(data)}"):
        ShardReader(path, entry=entry)
    with pytest.raises(ShardFormatError, match=rf"{path}: not a readable Arrow IPC file"):
        ShardReader(path)


def test_flipped_byte_fails_the_checksum(small_cache):
    cache, _ = small_cache
    path = cache / shard_file_name(0)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    entry = load_manifest(cache).shards[0]
    with pytest.raises(ShardFormatError, match=rf"{path}: sha256 does not match"):
        ShardReader(path, entry=entry, verify_checksum=True)


def test_content_hash_mismatch_names_file_and_row(tmp_path, small_cache):
    cache, _ = small_cache
    src, dst = cache / shard_file_name(0), tmp_path / shard_file_name(0)
    rewrite_shard(src, dst, lambda t: t.set_column(t.schema.get_field_index("content_hash"), "content_hash",
                                                    pa.array([b"\0" * 16] * t.num_rows, pa.binary(16))))
    with ShardReader(dst) as reader, pytest.raises(ShardFormatError, match=rf"{dst}: row 0: content hash"):
        list(reader.iter_rows(verify_content=True))


def test_missing_column_is_named(tmp_path, small_cache):
    cache, _ = small_cache
    dst = tmp_path / shard_file_name(0)
    rewrite_shard(cache / shard_file_name(0), dst, lambda t: t.drop_columns(["lse"]))
    with pytest.raises(ShardFormatError, match=rf"{dst}: missing column\(s\) lse"):
        ShardReader(dst)


def test_unknown_format_version_in_shard_and_manifest(tmp_path, small_cache):
    cache, _ = small_cache
    dst = tmp_path / shard_file_name(0)
    rewrite_shard(cache / shard_file_name(0), dst, lambda t: t, spec_change={"format_version": 9})
    with pytest.raises(ShardFormatError, match=rf"{dst}: unknown shard format version 9"):
        ShardReader(dst)
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    manifest["format_version"] = 7
    (cache / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match=rf"{cache / MANIFEST_NAME}: unknown format version 7"):
        load_manifest(cache)


def test_manifest_disagreeing_with_shard_size(small_cache):
    cache, _ = small_cache
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    manifest["shards"][0]["bytes"] += 1
    (cache / MANIFEST_NAME).write_text(json.dumps(manifest))
    entry = load_manifest(cache).shards[0]
    with pytest.raises(ShardFormatError, match=rf"{cache / entry.file}: .* bytes on disk, manifest says"):
        ShardReader(cache / entry.file, entry=entry)


@pytest.mark.parametrize("name", ["../outside.arrow", "/etc/passwd", "sub/shard-00000.arrow", ".."])
def test_manifest_names_escaping_the_directory_are_refused(small_cache, name):
    cache, _ = small_cache
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    manifest["shards"][0]["file"] = name
    (cache / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match=r"manifest.json: shard file .* resolves outside"):
        load_manifest(cache)
    assert resolve_inside(cache, "shard-00001.arrow") == (cache / "shard-00001.arrow").resolve()


# ---------------------------------------------------------------- a killed writer

KILLED_WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from common.shard_writer import ShardWriter
    from common.spec import ShardSpec, TargetSpec
    from peaked import teacher_row

    spec = ShardSpec(vocab_size=5000, targets=TargetSpec(k=8))
    writer = ShardWriter(Path(sys.argv[1]), 1, spec, 2, 10**9, batch_rows=1)
    row_id = 2
    while True:  # never closes: killed mid-write
        writer.add(teacher_row(spec, row_id, 30, seed=0).row)
        if row_id == 3:
            print("flushed", flush=True)
        row_id += 1
""")


def test_killed_writer_leaves_no_visible_shard_and_manifest_unchanged(tmp_path):
    cache = tmp_path / "cache"
    spec = ShardSpec(vocab_size=SMALL_V, targets=TargetSpec(k=8))
    write_cache(cache, spec, [[30, 30]])
    manifest_before = (cache / MANIFEST_NAME).read_bytes()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(cache), str(REPO / "tests")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "flushed", proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    tmp_files = list(cache.glob(".tmp-*"))
    assert tmp_files and all(p.stat().st_size > 0 for p in tmp_files)  # it was mid-write
    assert sorted(p.name for p in cache.glob("shard-*")) == [shard_file_name(0), shard_file_name(0) + ".json"]
    assert (cache / MANIFEST_NAME).read_bytes() == manifest_before
    # A refresh (what the next run does) sees only the finished shard.
    refreshed = CacheDir(cache).refresh_manifest(load_manifest(cache))
    assert [s.file for s in refreshed.shards] == [shard_file_name(0)]
    assert len(read_all(cache / shard_file_name(0))) == 2
    shutil.rmtree(cache)
