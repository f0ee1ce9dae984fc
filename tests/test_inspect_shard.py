"""`vpmoe inspect-shard` on written caches: the numbers it reports are the ones
written, --row gives the decoded targets, and every kind of bad input exits
non-zero with a message naming the file (and row), modifying nothing."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import zstandard
from typer.testing import CliRunner

from cli.main import app
from common import codec
from common.causal_lm import IGNORE_INDEX
from common.manifest import MANIFEST_NAME, shard_file_name
from common.spec import HiddenSpec, ShardSpec, TargetSpec, hidden_positions
from peaked import rewrite_shard, write_cache

V = 5_000
LENGTHS = [[40, 33], [50]]
SPEC = ShardSpec(vocab_size=V, targets=TargetSpec(k=16, temperatures=(1.0, 2.0)),
                 hidden=HiddenSpec(layers=(2,), dtype="bf16", token_fraction=0.5, hidden_size=32, seed=3))


def invoke(*args: str):
    return CliRunner().invoke(app, ["inspect-shard", *map(str, args)])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    return path, write_cache(path, SPEC, LENGTHS)


def snapshot(directory: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- a sound cache

def test_human_output(cache):
    path, truths = cache
    result = invoke(path, "--verify")
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("topk_ids", "topk_values", "topk_max", "lse", "hidden_2", "peaked-synthetic",
                 "bytes/token (targets)", "top1_prob", "verify: OK", "shard-00001.arrow"):
        assert text in out, text
    assert f"{sum(len(t.row.input_ids_L) for t in truths.values()):,}" in out


def test_json_reports_what_was_written(cache):
    path, truths = cache
    result = invoke(path, "--verify", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    tokens = sum(map(sum, LENGTHS))
    assert report["totals"]["rows"] == 3 and report["totals"]["tokens"] == tokens
    assert report["totals"]["positions"] == tokens - 3
    assert [s["rows"] for s in report["shards"]] == [2, 1]
    assert report["manifest"]["teacher"]["model"] == "peaked-synthetic"
    assert report["spec"] == json.loads(json.dumps(SPEC.to_dict()))
    assert report["verify"] == {"ok": True, "rows_checked": 3, "num_problems": 0, "problems": []}

    # Bytes per column: uncompressed from the written arrays, stored sizes from
    # recompressing each Arrow buffer at the writer's level (zstd 3).
    expected = {}
    for shard in (path / shard_file_name(0), path / shard_file_name(1)):
        with pa.memory_map(str(shard)) as source:
            reader = ipc.open_file(source)
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)
                for name in batch.schema.names:
                    e = expected.setdefault(name, [0, 0])
                    for buf in batch.column(name).buffers():
                        if buf is not None and buf.size:
                            e[0] += 8 + len(zstandard.ZstdCompressor(level=3).compress(buf.to_pybytes()))
                            e[1] += buf.size
    columns = {c["name"]: c for c in report["columns"]}
    assert list(columns) == [f["name"] for f in report["schema"]]
    for name, (stored, raw) in expected.items():
        assert (columns[name]["compressed_bytes"], columns[name]["uncompressed_bytes"]) == (stored, raw), name
    assert columns["input_ids"]["uncompressed_bytes"] == 4 * tokens + 4 * (2 + 1 + 1 + 1)  # data + offsets
    k = SPEC.targets.k
    assert columns["topk_ids"]["uncompressed_bytes"] == 2 * k * (tokens - 3) + 4 * 5  # 2-byte ids at V=5,000
    file_bytes = sum((path / s["file"]).stat().st_size for s in report["shards"])
    assert report["totals"]["file_bytes"] == file_bytes
    assert sum(c["compressed_bytes"] for c in columns.values()) + report["totals"]["overhead_bytes"] == file_bytes
    assert report["totals"]["bytes_per_token"] == pytest.approx(file_bytes / tokens)

    # Statistics against the float64 truth.
    stats = report["stats"]
    lp_P = np.concatenate([t.logits_PV.max(1) - t.lse_PT[:, 0] for t in truths.values()])
    assert stats["top1_prob"]["mean"] == pytest.approx(np.exp(lp_P).mean(), abs=1e-6)
    mass_P = np.concatenate([np.exp(np.sort(t.logits_PV, 1)[:, -k:].astype(np.float64) - t.lse_PT[:, :1]).sum(1)
                             for t in truths.values()])
    assert stats["topk_mass"]["mean"] == pytest.approx(mass_P.mean(), abs=1e-3)
    assert stats["entropy_lower"]["mean"] <= stats["entropy_upper"]["mean"]
    assert stats["next_token_is_top1_fraction"] == 1.0
    trained = np.concatenate([t.row.labels_L[1:] != IGNORE_INDEX for t in truths.values()])
    assert stats["trained_position_fraction"] == pytest.approx(trained.mean())
    norms = np.concatenate([t.hidden[2].norm(dim=-1).numpy() for t in truths.values()])
    assert stats["hidden"]["2"]["norm"]["mean"] == pytest.approx(norms.mean(), rel=1e-2)


def test_row_json_gives_decoded_targets(cache):
    path, truths = cache
    result = invoke(path, "--row", 2, "--json")  # the first row of the second shard
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["row"]
    truth = truths[2]
    assert (row["shard"], row["row_id"]) == (shard_file_name(1), 2)
    assert row["input_ids"] == truth.row.input_ids_L.tolist()
    assert row["labels"] == truth.row.labels_L.tolist()
    assert len(row["positions"]) == len(truth.row.input_ids_L) - 1
    scale = SPEC.targets.value_scale
    for p in row["positions"]:
        t = p["t"]
        assert p["next_token"] == truth.row.input_ids_L[t + 1]
        assert p["ids"][0] == p["next_token"]  # target t describes token t+1
        assert set(p["ids"]) == set(truth.row.targets.ids_PK[t].tolist())
        true_K = truth.logits_PV[t, p["ids"]].astype(np.float64)
        bound_K = codec.value_error_bound(true_K.max() - true_K, scale) + 1e-5
        assert (np.abs(np.array(p["logits"]) - true_K) <= bound_K).all()
        for ti, temp in enumerate(SPEC.targets.temperatures):
            exact_K = true_K / temp - truth.lse_PT[t, ti]
            assert (np.abs(np.array(p["logprobs"][str(temp)]) - exact_K) <= bound_K / temp + 1e-5).all()
    assert row["hidden"]["positions"] == hidden_positions(2, 50, 0.5, 3).tolist()


def test_shard_file_path_and_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(["the cat sat on the mat", "the teacher predicts the next token"] * 20, trainer)
    (tmp_path / "tok").mkdir()
    tokenizer.save(str(tmp_path / "tok" / "tokenizer.json"))
    spec = ShardSpec(vocab_size=tokenizer.get_vocab_size(), targets=TargetSpec(k=4, temperatures=(2.0,)))
    write_cache(tmp_path / "cache", spec, [[12]])
    shard = tmp_path / "cache" / shard_file_name(0)
    result = invoke(shard, "--row", 0, "--tokenizer", tmp_path / "tok", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kind"] == "shard"
    row = report["row"]
    assert row["tokens"] == [tokenizer.decode([i]) for i in row["input_ids"]]
    assert row["positions"][0]["id_tokens"] == [tokenizer.decode([i]) for i in row["positions"][0]["ids"]]
    assert report["stats"]["temperature"] == 2.0  # T=1 not stored: stats at the stored one
    human = invoke(shard, "--row", 0, "--tokenizer", tmp_path / "tok")
    assert human.exit_code == 0, human.output
    assert repr(row["tokens"][1]) in human.output


def test_sampled_cache(tmp_path):
    spec = ShardSpec(vocab_size=V, targets=TargetSpec(mode="sampled", num_samples=50))
    write_cache(tmp_path, spec, [[30, 21]])
    result = invoke(tmp_path, "--verify", "--row", 1, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["stats"]["next_token_sampled_fraction"] == 1.0
    for p in report["row"]["positions"]:
        assert sum(p["counts"]) == 50 and p["next_token"] in p["ids"]
        assert p["counts"] == sorted(p["counts"], reverse=True)


# ---------------------------------------------------------------- bad input

def truncate(path: Path) -> Path:
    shard = path / shard_file_name(1)
    shard.write_bytes(shard.read_bytes()[:999])
    return path


def flip_byte(path: Path) -> Path:
    shard = path / shard_file_name(0)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    return path


def edit_manifest(path: Path, change) -> Path:
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    change(manifest)
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    return path


def remove_shard(path: Path) -> Path:
    (path / shard_file_name(1)).unlink()
    return path


def move_rewritten(path: Path, **kwargs) -> Path:
    """Rewrite shard 0 into a directory of its own (no manifest or sidecar)."""
    alone = path / "alone"
    alone.mkdir()
    rewrite_shard(path / shard_file_name(0), alone / shard_file_name(0), **kwargs)
    return alone / shard_file_name(0)


def garbage_file(path: Path) -> Path:
    (path / "alone.arrow").write_bytes(b"ARROW1\0\0" + b"\x07" * 200)
    return path / "alone.arrow"


def set_column(name: str, value):
    return lambda t: t.set_column(t.schema.get_field_index(name), name,
                                  pa.array([value] * t.num_rows, t.schema.field(name).type))


FORMAT_ERRORS = {
    # name: (corrupt(cache) -> path to inspect, extra args, file named, message)
    "truncated": (truncate, [], shard_file_name(1), "bytes on disk, manifest says"),
    "flipped_byte": (flip_byte, ["--verify"], shard_file_name(0), "sha256 does not match"),
    "manifest_rows": (lambda p: edit_manifest(p, lambda m: m["shards"][1].update(rows=5)),
                      [], shard_file_name(1), "manifest says 5 rows, the shard holds 1"),
    "manifest_missing_shard": (remove_shard, [], shard_file_name(1), "shard file not found"),
    "manifest_version": (lambda p: edit_manifest(p, lambda m: m.update(format_version=99)),
                         [], MANIFEST_NAME, "unknown format version 99"),
    "manifest_escape": (lambda p: edit_manifest(p, lambda m: m["shards"][0].update(file="../x.arrow")),
                        [], MANIFEST_NAME, "resolves outside the cache directory"),
    "missing_column": (lambda p: move_rewritten(p, transform=lambda t: t.drop_columns(["topk_values"])),
                       [], shard_file_name(0), r"missing column\(s\) topk_values"),
    "shard_version": (lambda p: move_rewritten(p, transform=lambda t: t, spec_change={"format_version": 3}),
                      [], shard_file_name(0), "unknown shard format version 3"),
    "not_a_shard": (garbage_file, [], "alone.arrow", "not a readable Arrow IPC file"),
}


@pytest.mark.parametrize("case", sorted(FORMAT_ERRORS))
def test_format_errors_exit_2_with_one_line_naming_the_file(tmp_path, case):
    corrupt, args, named, message = FORMAT_ERRORS[case]
    write_cache(tmp_path, ShardSpec(vocab_size=V, targets=TargetSpec(k=8)), [[20, 15], [18]])
    target = corrupt(tmp_path)
    before = snapshot(tmp_path)
    result = invoke(target, *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert named in lines[0]
    assert re.search(message, lines[0]), lines[0]
    assert snapshot(tmp_path) == before


def _low_lse(row):
    row.targets.lse_PT[4, 0] = row.targets.logits_PK[4].max() - 1.0


def _lse_below_topk(row):
    # Above the max logit but below the log-sum-exp of the kept top-k.
    row.targets.lse_PT[6, 1] = row.targets.logits_PK[6].max() / 2.0 + 1e-3


def _nan_lse(row):
    row.targets.lse_PT[2, 1] = np.nan


def _inf_hidden(row):
    row.hidden[2][1, 3] = math.inf


def _bad_counts(row):
    row.targets.counts_S[0] += 1


HIDDEN = HiddenSpec(layers=(2,), dtype="bf16", hidden_size=16)
ROW_PROBLEMS = {
    "lse_below_max": (TargetSpec(k=8), _low_lse, r"row 1: position 4: lse at T=1.0 .* below max logit"),
    "lse_below_topk": (TargetSpec(k=8), _lse_below_topk, r"row 1: position 6: lse at T=2.0 .* below the log-sum-exp"),
    "nan": (TargetSpec(k=8), _nan_lse, r"row 1: position 2: NaN or Inf"),
    "hidden_inf": (TargetSpec(k=8), _inf_hidden, r"row 1: NaN or Inf in hidden layer 2"),
    "counts": (TargetSpec(mode="sampled", num_samples=50), _bad_counts,
               r"row 1: position 0: counts sum to 51, expected N=50"),
}


@pytest.mark.parametrize("case", sorted(ROW_PROBLEMS))
def test_verify_names_file_and_row_and_exits_1(tmp_path, case):
    targets, tweak, message = ROW_PROBLEMS[case]
    spec = ShardSpec(vocab_size=V, targets=targets, hidden=HIDDEN)
    write_cache(tmp_path, spec, [[20, 15]], tweak=lambda r: tweak(r) if r.row_id == 1 else None)
    before = snapshot(tmp_path)
    assert invoke(tmp_path).exit_code == 0  # only --verify looks at values
    result = invoke(tmp_path, "--verify", "--json")
    assert result.exit_code == 1, result.output
    verify = json.loads(result.stdout)["verify"]
    assert not verify["ok"] and verify["num_problems"] == 1, verify
    assert str(tmp_path / shard_file_name(0)) in verify["problems"][0]
    assert re.search(message, verify["problems"][0]), verify["problems"][0]
    human = invoke(tmp_path, "--verify")
    assert human.exit_code == 1 and "1 problem" in human.output
    assert snapshot(tmp_path) == before


def test_verify_content_hash_and_vocab_range(tmp_path):
    write_cache(tmp_path, ShardSpec(vocab_size=V, targets=TargetSpec(k=8)), [[20, 15]])
    bad_hash = move_rewritten(tmp_path, transform=set_column("content_hash", b"\0" * 16))
    result = invoke(bad_hash, "--verify")
    assert result.exit_code == 1
    assert f"{bad_hash}: row 0: content hash does not match" in " ".join(result.output.split())
    # Same shard bytes claiming a smaller vocabulary (ids still 2 bytes): ids out of range.
    (tmp_path / "small").mkdir()
    small_vocab = tmp_path / "small" / shard_file_name(0)
    rewrite_shard(tmp_path / shard_file_name(0), small_vocab, transform=lambda t: t, spec_change={"vocab_size": 300})
    result = invoke(small_vocab, "--verify", "--json")
    assert result.exit_code == 1
    problems = json.loads(result.stdout)["verify"]["problems"]
    assert any("top-k id outside [0, 300)" in p and str(small_vocab) in p for p in problems)


def test_manifest_totals_disagreeing_fail_verify(tmp_path):
    write_cache(tmp_path, ShardSpec(vocab_size=V, targets=TargetSpec(k=8)), [[20, 15]])
    edit_manifest(tmp_path, lambda m: m["totals"].update(tokens=1))
    result = invoke(tmp_path, "--verify", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["verify"]["problems"] == [
        f"{tmp_path / MANIFEST_NAME}: totals.tokens is 1, the shards hold 35"]


def test_row_out_of_range(cache):
    path, _ = cache
    result = invoke(path, "--row", 3)
    assert result.exit_code == 2 and f"{path}: row 3 out of range (3 rows)" in result.stderr
