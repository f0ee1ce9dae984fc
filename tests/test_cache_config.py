"""`cache-teacher`'s config: every shipped configs/cache_*.yaml loads, flags and `--set` override
a file's keys, errors name the key, and the resolved config is what the manifest records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.manifest import CacheManifest
from common.spec import ShardSpec
from teacher_cache.cache_run import CacheConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("cache_*.yaml")), ids=lambda p: p.name)
def test_every_shipped_cache_config_loads_and_round_trips(path):
    cfg = CacheConfig.load(path)
    assert CacheConfig.from_json(cfg.to_json()) == cfg


def test_the_phase1_config_is_the_documented_cache():
    cfg = CacheConfig.load(CONFIGS / "cache_phase1_gptoss20b.yaml")
    assert cfg.teacher.model == "openai/gpt-oss-20b"
    assert (cfg.targets.target_spec(0).k, cfg.targets.temperatures, cfg.targets.sampled) == (64, (1.0, 2.0), None)
    assert (cfg.hidden.layers, cfg.hidden.dtype, cfg.hidden.token_fraction) == ((12, 24), "fp8", 0.25)
    # README: `--sampled 50` switches it to sampled targets
    sampled = CacheConfig.load(CONFIGS / "cache_phase1_gptoss20b.yaml", [], sampled=50).targets.target_spec(0)
    assert (sampled.mode, sampled.num_samples) == ("sampled", 50)


def test_flags_and_sets_override_the_file_and_the_defaults_are_the_old_flags(tmp_path):
    path = CONFIGS / "cache_phase1_gptoss20b.yaml"
    cfg = CacheConfig.load(path, ["teacher.selection.fused=false", "hidden.layers=[6]"], top_k=8, out="/x")
    assert (cfg.targets.top_k, cfg.out, cfg.hidden.layers, cfg.teacher.selection.fused) == (8, "/x", (6,), False)
    assert cfg.hidden.dtype == "fp8"  # untouched keys keep the file's value
    plain = CacheConfig.from_flags(model="m", data="d", out="o")
    assert (plain.targets.temperatures, plain.writer.compression, plain.teacher.max_tokens_per_batch,
            plain.teacher.selection.topk_block) == ((1.0, 2.0), "zstd", 16384, 128)


@pytest.mark.parametrize("sets,message", [
    (["targets.top_kk=3"], r"unknown config key 'targets\.top_kk'; did you mean 'targets\.top_k'\?"),
    (["teacher.rows_per_shard=3"], r"unknown config key 'teacher\.rows_per_shard'"),  # set by the run
    (["hidden.layers=x"], r"config key 'hidden\.layers' expects a list"),
    (["teacher.selection.topk_block=-1"], r"teacher\.selection\.topk_block: must be an int >= 0"),
    (["targets.top_k=0"], r"targets: --top-k must be >= 1"),
])
def test_bad_keys_and_values_name_the_key(sets, message):
    with pytest.raises(ValueError, match=message):
        CacheConfig.load(CONFIGS / "cache_tiny_cpu.yaml", sets)


def test_old_manifests_without_a_config_load_and_new_ones_keep_it():
    manifest = CacheManifest(spec=ShardSpec(vocab_size=1000))
    d = json.loads(manifest.to_json())
    assert "config" not in d  # a manifest written before the field existed
    assert CacheManifest.from_json(json.dumps(d), "m").config == {}
    recorded = CacheConfig.from_flags(model="m", data="d", out="o", top_k=8).to_dict()
    manifest.config = recorded
    again = CacheManifest.from_json(manifest.to_json(), "m")
    assert again.config == recorded and CacheConfig.from_json(json.dumps(again.config)).targets.top_k == 8


def test_the_recorded_config_is_the_same_for_a_run_and_its_per_gpu_workers():
    run = CacheConfig.from_flags(model="m", data="d", out="o", gpus=(0, 1))
    worker = CacheConfig.from_flags(model="m", data="d", out="o", num_workers=4, worker_index=3)
    worker.quiet = True
    assert run.cache_settings() == worker.cache_settings()
    assert "gpus" not in run.cache_settings() and run.cache_settings()["targets"] == run.to_dict()["targets"]

