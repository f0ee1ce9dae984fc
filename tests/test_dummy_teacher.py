"""`cache-teacher --load-format dummy`: a teacher at a model's shape with random weights (rehearsals,
benchmarks) is built from its config alone, deterministically, and the manifest says its weights
are dummy so no cache made from it passes for a real teacher's."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, LlamaConfig

from common.manifest import load_manifest
from common.cache_dir import CacheDir
from teacher_cache.cache_run import CacheConfig, run_cache

VOCAB = 128


def test_a_config_only_teacher_caches_with_dummy_weights_named_in_the_manifest(tmp_path):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config.save_pretrained(tmp_path / "teacher")  # config.json only: no weights at all
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, VOCAB, size=n).astype(np.int32) for n in (9, 17, 12)]
    pq.write_table(pa.table({"input_ids": [r.tolist() for r in rows]}), tmp_path / "train.parquet")
    cfg = CacheConfig.from_flags(model=str(tmp_path / "teacher"), data=str(tmp_path / "train.parquet"), out=str(tmp_path / "c"),
                      backend="hf", device="cpu", dtype="fp32", top_k=4, temperatures=(1.0,),
                      load_format="dummy", show_progress=False)
    run_cache(cfg, Console(file=io.StringIO()))

    manifest = load_manifest(tmp_path / "c")
    assert manifest.teacher["weights_fingerprint"] == "dummy"
    # The dummy weights are the config's random initialisation under seed 0: the cached top-k of
    # position t are that model's float64 logits for token t + 1.
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).double().eval()
    cached = CacheDir(tmp_path / "c").read_rows()
    assert sorted(cached) == [0, 1, 2]
    for row_id, ids in enumerate(rows):
        with torch.no_grad():
            logits_PV = model(input_ids=torch.from_numpy(ids.astype(np.int64))[None]).logits[0, :-1]
        # Top values are stored with a bounded quantisation of their gaps; the largest logit and the
        # full log-sum-exp are exact: both single out the seeded model.
        row = cached[row_id]
        assert row.targets.logits_PK.shape == (len(ids) - 1, 4)
        expected_PK = logits_PV.topk(4, dim=-1).values
        np.testing.assert_allclose(row.targets.logits_PK.max(axis=1), expected_PK[:, 0].numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(row.targets.lse_PT[:, 0], torch.logsumexp(logits_PV, -1).numpy(), rtol=0, atol=1e-4)
        assert np.abs(expected_PK.numpy()).max() > 0  # not a test on zeros


def test_an_unknown_load_format_is_refused_by_flag(tmp_path):
    with pytest.raises(ValueError, match="--load-format"):
        CacheConfig.from_flags(model="m", data="d", out=str(tmp_path / "c"), load_format="pickle")
