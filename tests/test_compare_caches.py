"""teacher_cache/compare.py and its command, bench/compare_caches.py, the row-by-row
check behind the multi-GPU run, against overlaps and differences recomputed in float64
from the teachers."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.manifest import MANIFEST_NAME
from common.shard_format import ShardFormatError
from common.cache_dir import CacheDir
from teacher_cache.compare import compare
from train_fixtures import make_rows, tiny_teacher, write_cache

ROOT = Path(__file__).resolve().parents[1]
K = 8


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    rows = make_rows(12, 9, 20, seed=3)
    teacher = tiny_teacher(layers=2, hidden=32)
    nudged = copy.deepcopy(teacher)
    with torch.no_grad():  # a small change of the lm_head: most top-k sets stay, some members swap
        noise = torch.randn(nudged.lm_head.weight.shape, generator=torch.Generator().manual_seed(5))
        nudged.lm_head.weight.add_(0.05 * noise)
    write_cache(tmp / "a", rows, teacher, k=K, hidden_layers=(1,), rows_per_shard=4)
    write_cache(tmp / "a5", rows, teacher, k=K, hidden_layers=(1,), rows_per_shard=5)
    write_cache(tmp / "b", rows, nudged, k=K, hidden_layers=(1,), rows_per_shard=4)
    return tmp, rows, teacher, nudged


def test_same_rows_in_other_shards_compare_equal(caches):
    tmp, *_ = caches
    report = compare(CacheDir(tmp / "a").read_rows(), CacheDir(tmp / "a5").read_rows())
    assert report["same_row_ids"] and report["same_tokens"] and report["rows_a"] == 12
    assert report["max_lse_diff"] == 0.0 and report["mean_topk_overlap"] == 1.0
    assert report["mean_abs_logit_diff"] == 0.0
    assert report["min_hidden_cosine"] == pytest.approx(1.0, abs=1e-12)


def test_overlap_and_differences_match_a_float64_recomputation(caches):
    tmp, rows, teacher, nudged = caches
    report = compare(CacheDir(tmp / "a").read_rows(), CacheDir(tmp / "b").read_rows())
    overlaps, lse_diff = [], 0.0
    with torch.no_grad():
        for ids, _ in rows:
            x = torch.from_numpy(ids.astype(np.int64))[None]
            la_PV, lb_PV = (m(input_ids=x).logits[0, :-1].double() for m in (teacher, nudged))
            ta, tb = la_PV.topk(K, -1).indices, lb_PV.topk(K, -1).indices
            overlaps += [len(set(a.tolist()) & set(b.tolist())) / K for a, b in zip(ta, tb)]
            for t in (1.0, 2.0):  # the cache stores float32 log-sum-exps
                diff = (torch.logsumexp(la_PV / t, -1).float() - torch.logsumexp(lb_PV / t, -1).float()).abs()
                lse_diff = max(lse_diff, float(diff.max()))
    assert 0.0 < report["mean_topk_overlap"] < 1.0
    assert report["mean_topk_overlap"] == pytest.approx(np.mean(overlaps), abs=1e-12)
    assert report["max_lse_diff"] == pytest.approx(lse_diff, rel=1e-6)
    assert report["mean_abs_logit_diff"] > 0.0


def test_a_missing_row_is_reported_and_the_command_fails(caches, tmp_path):
    tmp, rows, teacher, _ = caches
    write_cache(tmp_path / "short", rows[:8], teacher, k=K, hidden_layers=(1,), rows_per_shard=4)
    assert compare(CacheDir(tmp / "a").read_rows(), CacheDir(tmp_path / "short").read_rows())["same_row_ids"] is False
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_caches.py"), str(tmp / "a"),
                           str(tmp_path / "short")], capture_output=True, text=True, check=False)
    assert done.returncode == 1 and '"same_row_ids": false' in done.stdout
    shutil.rmtree(tmp_path / "short")


def test_a_row_listed_twice_is_named(caches, tmp_path):
    tmp, *_ = caches
    shutil.copytree(tmp / "a", tmp_path / "twice")
    manifest = json.loads((tmp_path / "twice" / MANIFEST_NAME).read_text())
    manifest["shards"].append(dict(manifest["shards"][0], index=99))  # the same shard file listed again
    (tmp_path / "twice" / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match=r"shard-00000\.arrow: row 0 is also in another shard"):
        CacheDir(tmp_path / "twice").read_rows()


def test_caches_of_different_hidden_layers_are_refused_by_name(caches, tmp_path):
    tmp, rows, teacher, _ = caches
    write_cache(tmp_path / "other", rows, teacher, k=K, hidden_layers=(2,), rows_per_shard=4)
    with pytest.raises(ValueError, match=r"row 0: the caches hold different targets or hidden layers"):
        compare(CacheDir(tmp / "a").read_rows(), CacheDir(tmp_path / "other").read_rows())
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_caches.py"), str(tmp / "a"),
                           str(tmp_path / "other")], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "layers [1] and [2]" in done.stderr
