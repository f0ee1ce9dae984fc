"""Dense targets end to end: `cache-teacher --dense-from-last-layer` (hf backend) records the
teacher's final norm and lm_head, the head rebuilds the teacher's logits from the cached last
layer (target t from hidden t: the distribution of token t + 1), `vpmoe train` with
`kl_mode: dense` reads them, and a changed head is refused by name. The loss itself is checked
against float64 references in test_losses.py."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from common import codec
from common.cache_dir import CacheDir
from common.inspect import InspectOptions, inspect_path
from common.manifest import load_manifest
from common.teacher_head import head_fingerprint, load_teacher_head
from demo.tiny_models import save_model
from student_train.losses import LossConfig, distill_loss, get_divergence
from student_train.losses.dense_targets import DenseTargets
from student_train.trainer import Trainer
from teacher_cache.cache_run import CacheConfig, run_cache
from train_fixtures import make_rows, tiny_config, tiny_teacher

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["data.seq_len=16", "data.micro_batch=4", "data.global_batch=8", "export.enabled=false",
         "eval.every=0", "loss.hidden_cosine=0", "loss.layer_pairs=[]"]


def cache(model_dir: Path, data: Path, out: Path, **kw):
    cfg = CacheConfig.from_flags(model=str(model_dir), data=str(data), out=str(out), show_progress=False, **kw)
    return run_cache(cfg, Console(file=io.StringIO()))


@pytest.fixture(scope="module")
def dense(tmp_path_factory, one_thread):
    """A 3-layer llama teacher, its rows, and a top-8 cache with dense targets on half the positions."""
    root = tmp_path_factory.mktemp("dense")
    teacher = tiny_teacher()
    model_dir = save_model(teacher, root / "teacher")
    rows = make_rows(6, 10, 16, seed=0)
    table = pa.table({"input_ids": [ids.tolist() for ids, _ in rows], "labels": [lab.tolist() for _, lab in rows]})
    pq.write_table(table, root / "train.parquet")
    cache(model_dir, root / "train.parquet", root / "cache", top_k=8, hidden_dtype="bf16",
          hidden_token_fraction=0.5, dense_from_last_layer=True, rows_per_shard=3)
    return teacher, model_dir, rows, root


def test_the_manifest_records_the_head_and_the_last_layer_is_cached(dense):
    teacher, model_dir, _, root = dense
    manifest = load_manifest(root / "cache")
    record = manifest.dense_head
    num_layers = teacher.config.num_hidden_layers
    assert record.layer == num_layers and manifest.spec.hidden.layers == (num_layers,)
    assert manifest.spec.hidden.token_fraction == 0.5 and manifest.spec.hidden.dtype == "bf16"
    assert manifest.spec.targets.mode == "topk" and manifest.spec.targets.k == 8  # the fallback
    assert record.model_dir == str(model_dir.resolve())
    assert (record.norm.tensor, record.norm.shape) == ("model.norm.weight", (48,))
    assert (record.lm_head.tensor, record.lm_head.shape) == ("lm_head.weight", (300, 48))
    assert record.fingerprint == head_fingerprint(model_dir, record)
    report = inspect_path(root / "cache", InspectOptions(verify=True))
    assert report["dense_head"]["fingerprint"] == record.fingerprint and report["verify"]["ok"]


def test_dense_shards_are_the_shards_of_the_same_layer_cached_plainly(dense, tmp_path):
    """--dense-from-last-layer changes the manifest, never a shard byte."""
    teacher, model_dir, _, root = dense
    cache(model_dir, root / "train.parquet", tmp_path / "plain", top_k=8, hidden_dtype="bf16",
          hidden_token_fraction=0.5, hidden_layers=(teacher.config.num_hidden_layers,), rows_per_shard=3)
    for shard in sorted((root / "cache").glob("shard-*.arrow")):
        assert shard.read_bytes() == (tmp_path / "plain" / shard.name).read_bytes()
    assert load_manifest(tmp_path / "plain").dense_head is None
    assert "dense_head" not in json.loads((tmp_path / "plain" / "manifest.json").read_text())


@torch.no_grad()
def test_the_head_rebuilds_the_teachers_logits_of_the_next_token(dense):
    teacher, _, rows, root = dense
    manifest = load_manifest(root / "cache")
    head = load_teacher_head(manifest.dense_head).to(dtype=torch.float64)
    teacher_f64 = teacher.double()
    for row_id, row in CacheDir(root / "cache").read_rows().items():
        ids = torch.from_numpy(rows[row_id][0].astype(np.int64))[None]
        logits_LV = teacher_f64(ids).logits[0]
        positions_H = torch.tensor(row.hidden_positions_H, dtype=torch.int64)
        rebuilt_HV = head.logits(row.hidden[manifest.dense_head.layer], torch.float64)
        # hidden t (token t's stream) gives the logits of position t, which describe token t + 1
        kl_H = torch.sum(torch.softmax(logits_LV[positions_H], -1) * (
            torch.log_softmax(logits_LV[positions_H], -1) - torch.log_softmax(rebuilt_HV, -1)), -1)
        assert kl_H.max() < 1e-3, (row_id, kl_H.max())  # bf16 storage of the hidden state
        # ... and the stored top-k at target t agrees on the top-1 wherever t < L - 1
        inside_H = positions_H < len(ids[0]) - 1
        top1_H = row.targets.ids_PK[positions_H[inside_H], row.targets.logits_PK[positions_H[inside_H]].argmax(1)]
        np.testing.assert_array_equal(top1_H, rebuilt_HV[inside_H].argmax(-1).numpy())
        shifted = positions_H[positions_H < len(ids[0]) - 1]
        assert (rebuilt_HV[inside_H] - logits_LV[shifted + 1]).abs().max() > 0.1  # not token t + 2's


def test_a_changed_head_is_refused_naming_the_file(dense, tmp_path):
    _, model_dir, _, root = dense
    record = load_manifest(root / "cache").dense_head
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    tensors = load_file(str(other / record.lm_head.file))
    tensors[record.lm_head.tensor][0, 0] += 1.0
    save_file(tensors, str(other / record.lm_head.file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{other / record.lm_head.file}: the teacher's final norm and lm_head .* "
                                         "do not match the cache's fingerprint"):
        load_teacher_head(record, other)
    assert load_teacher_head(record, model_dir).vocab_size == 300  # the recorded one still loads


def test_the_same_bytes_under_another_dtype_are_refused(dense, tmp_path):
    """A header that relabels the head's bytes (bf16 -> f16: same size, other numbers) changes the
    fingerprint, though not one stored byte of the tensor does."""
    _, model_dir, _, root = dense
    record = load_manifest(root / "cache").dense_head
    other = tmp_path / "relabelled"
    shutil.copytree(model_dir, other)
    tensors = load_file(str(other / record.lm_head.file))
    head = tensors[record.lm_head.tensor]
    relabelled = torch.float16 if head.dtype != torch.float16 else torch.bfloat16
    tensors[record.lm_head.tensor] = head.view(relabelled)
    save_file(tensors, str(other / record.lm_head.file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="do not match the cache's fingerprint"):
        load_teacher_head(record, other)


def test_dense_needs_a_local_teacher_with_real_weights(dense, tmp_path):
    _, model_dir, _, root = dense
    with pytest.raises(ValueError, match="--dense-from-last-layer: a --load-format dummy teacher"):
        cache(model_dir, root / "train.parquet", tmp_path / "c", dense_from_last_layer=True, load_format="dummy")


def test_train_with_dense_kl_starts_near_zero_for_the_teacher_itself(dense, tmp_path):
    """The teacher as its own student: the dense KL is bf16 noise; the top-k tail KL of the same
    rows through the same trainer is not smaller, and the cache without a head is refused."""
    teacher, model_dir, _, root = dense
    kl = {}
    for mode in ("dense", "tail"):
        cfg = tiny_config(tmp_path / mode, model_dir, root / "cache", None, *SMALL, "optim.steps=1",
                          f"loss.kl_mode={mode}", "loss.kl_temperature=1.0", "student.freeze=[]")
        trainer = Trainer(cfg)
        try:
            batch = next(iter(trainer.train_loader))
            num_valid = float((batch.target_labels_BP() != -100).sum())
            with torch.no_grad():
                _, sums = trainer.model(batch, num_valid, 0.0)
            kl[mode] = float(sums.kl_sum) / float(sums.valid_tokens)
        finally:
            trainer.close()
    assert kl["dense"] < 1e-3 and kl["dense"] <= kl["tail"] + 1e-6, kl

    plain = tmp_path / "plain"
    cache(model_dir, root / "train.parquet", plain, top_k=8, rows_per_shard=3)
    cfg = tiny_config(tmp_path / "refused", model_dir, plain, None, *SMALL, "loss.kl_mode=dense")
    with pytest.raises(ValueError, match=f"{plain}: loss.kl_mode 'dense' needs a cache written with cache-teacher "
                                         "--dense-from-last-layer"):
        Trainer(cfg)


def test_a_sampled_fallback_at_another_temperature_is_refused_unless_skipped():
    from common.spec import TargetSpec

    dense_kl = get_divergence("dense")
    sampled = TargetSpec(mode="sampled", k=0, temperatures=(), num_samples=8)
    with pytest.raises(ValueError, match="^c: sampled targets are draws at T=1.*fallback of kl_mode 'dense'"):
        dense_kl.check_cache(sampled, LossConfig(kl_mode="dense", kl_temperature=2.0), "c")
    dense_kl.check_cache(sampled, LossConfig(kl_mode="dense", kl_temperature=2.0, dense_fallback="skip"), "c")


@pytest.mark.parametrize("storage", ["bf16", "fp8"])
def test_stored_hidden_error_is_small_and_measured(storage):
    """KL(dense from the stored state || from the exact state), per token, at T = 1 and 2: fp8's
    3 mantissa bits cost more than bf16's 8, both far below the top-k tail's error."""
    from test_losses import dense_targets, topk_targets

    gen = torch.Generator().manual_seed(0)
    n, vocab = 64, 2000
    exact = dense_targets(n, vocab, gen, None, width=64, stored_fraction=1.1)
    if storage == "bf16":
        stored_NE = exact.hidden_NE.to(torch.bfloat16).double()
    else:
        fp8_NE, scale_N = codec.quantize_fp8(exact.hidden_NE.float())
        stored_NE = fp8_NE.double() * scale_N.double()[:, None]
    teacher_NV = exact.head.logits(exact.hidden_NE, torch.float64)
    fallback = topk_targets(teacher_NV, 8)
    labels_N = torch.zeros(n, dtype=torch.int64)
    for t in (1.0, 2.0):
        # The student is the exact teacher: the loss's KL is then the storage error alone.
        student_ND, weight_VD = teacher_NV, torch.eye(vocab, dtype=torch.float64)
        targets = DenseTargets(stored_NE, exact.has_hidden_N, exact.head, fallback, False)
        _, m = distill_loss(student_ND, weight_VD, labels_N, targets, n, kl_mode="dense", kl_temperature=t)
        kl = m["kl_sum"].item() / n
        bound = 2e-5 if storage == "bf16" else 2e-3
        assert 0 < kl < bound, (storage, t, kl)
