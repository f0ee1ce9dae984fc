"""cache-teacher end to end on tiny teachers (hf backend): stored targets and hidden
states against a float64 recomputation from the model itself, sampled draws
against the teacher distribution, bad input, dry run and refusal rules."""

from __future__ import annotations

import dataclasses
import io
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console
from scipy import stats

from common import codec
from common.manifest import MANIFEST_NAME, load_manifest
from common.cache_dir import CacheDir
from common.shard_reader import ShardReader
from common.spec import HiddenSpec, ShardSpec, TargetSpec, content_hash, hidden_positions
from demo.tiny_models import build_model, save_model, tiny_gpt_oss_config, tiny_llama_config
from teacher_cache import cache_run
from teacher_cache.cache_run import CacheConfig, run_cache

VOCAB = 384
PREFIX = 6  # random tokens, labels -100; then a greedy continuation
GREEDY_LENGTHS = (10, 25, 40, 33)


# ---- helpers shared with test_cache_resume.py -------------------------------------

def float64_reference(model):
    """The same weights in float64 (GPT-OSS experts through the eager path, which takes float64)."""
    if hasattr(model, "set_experts_implementation") and model.config.model_type == "gpt_oss":
        model.set_experts_implementation("eager")
    return model.double().eval()


@torch.no_grad()
def greedy_rows(model_f64, seed: int, greedy_lengths=GREEDY_LENGTHS) -> list[np.ndarray]:
    """Random prefix + greedy continuation: input_ids[t + 1] is the argmax of logits[t]."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in greedy_lengths:
        ids = torch.randint(0, VOCAB, (1, PREFIX), generator=gen)
        for _ in range(n):
            ids = torch.cat([ids, model_f64(ids).logits[0, -1].argmax().view(1, 1)], dim=1)
        rows.append(ids[0].numpy().astype(np.int32))
    return rows


def write_parquet(path: Path, input_ids: list, labels: list | None = None) -> Path:
    columns = {"input_ids": pa.array([list(map(int, r)) for r in input_ids], type=pa.list_(pa.int32()))}
    if labels is not None:
        columns["labels"] = pa.array([list(map(int, r)) for r in labels], type=pa.list_(pa.int32()))
    pq.write_table(pa.table(columns), path)
    return path


def prefix_masked_labels(rows: list[np.ndarray]) -> list[np.ndarray]:
    labels = [r.copy() for r in rows]
    for lab in labels:
        lab[:PREFIX] = -100
    return labels


def random_rows(seed: int, count: int, low: int, high: int, vocab: int = VOCAB) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(n)).astype(np.int32) for n in rng.integers(low, high, count)]


def shard_bytes(cache_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(cache_dir).glob("shard-*.arrow"))}


def quiet_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200), buf


def cache(model_dir: Path, data: Path, out: Path, **kw) -> cache_run.RunSummary | None:
    kw.setdefault("show_progress", False)
    return run_cache(CacheConfig.from_flags(model=str(model_dir), data=str(data), out=str(out), **kw), quiet_console()[0])


# ---- fixtures -----------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")  # before the model fixtures too


@pytest.fixture(scope="module", params=["llama", "gpt_oss"])
def teacher(request, tmp_path_factory):
    """(kind, model dir, float64 model, data file, source rows, labels)."""
    root = tmp_path_factory.mktemp(request.param)
    config = tiny_llama_config(VOCAB) if request.param == "llama" else tiny_gpt_oss_config(VOCAB)
    model = build_model(config, seed=3)
    save_model(model, root / "model")
    model_f64 = float64_reference(model)
    rows = greedy_rows(model_f64, seed=11)
    labels = prefix_masked_labels(rows)
    data = write_parquet(root / "train.parquet", rows, labels)
    return request.param, root / "model", model_f64, data, rows, labels


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_sampled")
    model = build_model(tiny_llama_config(VOCAB), seed=5)
    save_model(model, root / "model")
    model_f64 = float64_reference(model)
    rows = greedy_rows(model_f64, seed=7, greedy_lengths=(30, 12, 41))
    data = write_parquet(root / "train.parquet", rows)
    return root / "model", model_f64, data, rows


# ---- targets and hidden states vs float64 --------------------------------------------

def test_topk_targets_and_hidden_states_equal_float64_recomputation(teacher, tmp_path):
    kind, model_dir, model_f64, data, rows, labels = teacher
    num_layers = model_f64.config.num_hidden_layers
    # Llama: bf16, every position; GPT-OSS: fp8 on a deterministic half of the positions.
    hidden_kw = (dict(hidden_layers=(1, num_layers), hidden_dtype="bf16") if kind == "llama" else
                 dict(hidden_layers=(1, num_layers), hidden_dtype="fp8", hidden_token_fraction=0.5))
    k, temperatures = 8, (1.0, 2.0)
    # A budget of 64 padded tokens forces several batches, some padded.
    cache(model_dir, data, tmp_path / "c", top_k=k, temperatures=temperatures, rows_per_shard=3,
          max_tokens_per_batch=64, logits_chunk=16, **hidden_kw)
    stored = CacheDir(tmp_path / "c").read_rows()
    assert sorted(stored) == list(range(len(rows)))

    captured = {}
    last_layer = model_f64.model.layers[num_layers - 1]
    hook = last_layer.register_forward_hook(lambda m, a, out: captured.__setitem__("last", out))
    try:
        for row_id, ids in enumerate(rows):
            row = stored[row_id]
            np.testing.assert_array_equal(row.input_ids_L, ids)
            np.testing.assert_array_equal(row.labels_L, labels[row_id])
            assert row.content_hash == content_hash(ids)
            with torch.no_grad():
                out = model_f64(torch.from_numpy(ids.astype(np.int64))[None], output_hidden_states=True)
            logits_LV = out.logits[0].numpy()
            # Target t is the teacher's distribution of token t + 1: logits of position t, t = 0..L-2.
            ref_PV = logits_LV[:-1]
            num_pos = len(ids) - 1
            assert row.targets.ids_PK.shape == (num_pos, k)
            order_PV = np.argsort(-ref_PV, axis=1)
            ref_sorted_PV = np.take_along_axis(ref_PV, order_PV, axis=1)
            for t in range(num_pos):
                if ref_sorted_PV[t, k - 1] - ref_sorted_PV[t, k] > 1e-4:  # the k-th id is not tied
                    assert set(row.targets.ids_PK[t].tolist()) == set(order_PV[t, :k].tolist()), (row_id, t)
                true_gap_K = ref_PV[t].max() - ref_PV[t, row.targets.ids_PK[t]]
                stored_gap_K = row.targets.logits_PK[t].max() - row.targets.logits_PK[t]
                bound_K = codec.value_error_bound(true_gap_K)
                assert np.all(np.abs(stored_gap_K - true_gap_K) <= bound_K + 1e-4), (row_id, t)
                assert abs(row.targets.logits_PK[t].max() - ref_PV[t].max()) < 1e-4
            for j, temp in enumerate(temperatures):
                lse_P = torch.logsumexp(torch.from_numpy(ref_PV) / temp, dim=-1).numpy()
                np.testing.assert_allclose(row.targets.lse_PT[:, j], lse_P, atol=1e-4, rtol=0)

            # The shift, explicitly: the greedy continuation makes token t + 1 the
            # top-1 of position t, so the stored top-1 of target t is input_ids[t + 1].
            top1_P = row.targets.ids_PK[np.arange(num_pos), row.targets.logits_PK.argmax(axis=1)]
            clear_P = ref_sorted_PV[:, 0] - ref_sorted_PV[:, 1] > 1e-3
            greedy_P = np.arange(num_pos) >= PREFIX - 1
            assert np.all(top1_P[greedy_P & clear_P] == ids[1:][greedy_P & clear_P])
            # ... and the comparison above would catch an off-by-one either way.
            lse_next_P = torch.logsumexp(torch.from_numpy(logits_LV[1:]), dim=-1).numpy()
            assert np.abs(row.targets.lse_PT[:, 0] - lse_next_P).max() > 0.1
            assert np.abs(row.targets.lse_PT[1:, 0] - torch.logsumexp(torch.from_numpy(ref_PV[:-1]), -1).numpy()).max() > 0.1

            positions = hidden_positions(row_id, len(ids), hidden_kw.get("hidden_token_fraction", 1.0), 0)
            np.testing.assert_array_equal(row.hidden_positions_H, positions)
            assert len(positions) < len(ids) if kind == "gpt_oss" else len(positions) == len(ids)
            # Layer i = residual stream leaving decoder layer i (1-based), before the final norm.
            refs = {1: out.hidden_states[1][0], num_layers: captured["last"][0]}
            assert not torch.allclose(refs[num_layers], out.hidden_states[num_layers][0]), "post-norm differs"
            for layer, ref_LD in refs.items():
                ref_HD = ref_LD[torch.from_numpy(positions).long()]
                got_HD = row.hidden[layer].double()
                if kind == "llama":  # bf16 rounding
                    tol_HD = 2.0 ** -8 * ref_HD.abs() + 1e-4
                else:  # fp8 e4m3: 3 mantissa bits, subnormal step 2^-9 of the per-token scale
                    scale_H = ref_HD.abs().amax(dim=-1, keepdim=True) / codec.FP8_E4M3_MAX
                    tol_HD = 2.0 ** -4 * ref_HD.abs() + scale_H * 2.0 ** -9 + 1e-5
                assert torch.all((got_HD - ref_HD).abs() <= tol_HD), (kind, row_id, layer)
    finally:
        hook.remove()
    manifest = load_manifest(tmp_path / "c")
    assert manifest.teacher["model_type"] == kind
    assert manifest.total_tokens == sum(len(r) for r in rows)


# ---- sampled targets ------------------------------------------------------------------

def test_sampled_counts_follow_the_teacher_distribution_of_the_next_token(llama, tmp_path):
    model_dir, model_f64, data, rows = llama
    draws = 4000
    cache(model_dir, data, tmp_path / "c", sampled=draws, seed=1234, rows_per_shard=8)
    row = CacheDir(tmp_path / "c").read_rows()[0]
    ids = rows[0]
    with torch.no_grad():
        probs_LV = torch.softmax(model_f64(torch.from_numpy(ids.astype(np.int64))[None]).logits[0], -1).numpy()
    offsets = np.concatenate([[0], np.cumsum(row.targets.sizes_P)])
    assert len(row.targets.sizes_P) == len(ids) - 1

    def chi_square(positions, shift: int) -> float:
        chi2 = dof = 0.0
        for t in positions:
            counts_V = np.zeros(VOCAB)
            sl = slice(offsets[t], offsets[t + 1])
            assert np.all(np.diff(row.targets.ids_S[sl]) > 0), "distinct ids, ascending"
            counts_V[row.targets.ids_S[sl]] = row.targets.counts_S[sl]
            assert counts_V.sum() == draws
            expected_V = draws * probs_LV[t + shift]
            big = expected_V >= 5  # pool small bins so the chi-square approximation holds
            obs = np.append(counts_V[big], counts_V[~big].sum())
            exp = np.append(expected_V[big], expected_V[~big].sum())
            keep = exp > 0
            chi2 += float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
            dof += keep.sum() - 1
        return float(stats.chi2.sf(chi2, dof))

    positions = range(PREFIX, PREFIX + 8)
    assert chi_square(positions, shift=0) > 1e-3  # target t follows the distribution of token t + 1
    assert chi_square(positions, shift=1) < 1e-6  # and not the next position's


def test_sampled_shards_do_not_depend_on_batching(llama, tmp_path):
    model_dir, _, data, _ = llama
    for budget, name in ((16, "one_row_per_batch"), (4096, "all_rows_in_one_batch")):
        cache(model_dir, data, tmp_path / name, sampled=64, seed=9, rows_per_shard=2, max_tokens_per_batch=budget,
              logits_chunk=7 if budget == 16 else 1024)
    a, b = shard_bytes(tmp_path / "one_row_per_batch"), shard_bytes(tmp_path / "all_rows_in_one_batch")
    assert len(a) == 2 and a == b


def test_hf_backend_returns_an_empty_row_without_running_the_model(llama):
    """cache-teacher refuses empty rows up front (data.validate); the backend still answers one."""
    from teacher_cache.backend import BackendOptions, SourceRow
    from teacher_cache.hf_backend import HFBackend

    model_dir, model_f64, _, rows = llama
    spec = ShardSpec(vocab_size=VOCAB, targets=TargetSpec(k=4),
                     hidden=HiddenSpec(layers=(1,), hidden_size=model_f64.config.hidden_size, dtype="fp8"))
    backend = HFBackend(spec, BackendOptions(model=str(model_dir), device="cpu", dtype="float32"))
    source = [SourceRow(0, rows[1].astype(np.int32), rows[1].astype(np.int32)),
              SourceRow(1, np.zeros(0, np.int32), np.zeros(0, np.int32))]
    got = {r.row_id: r for r in backend.run(source)}
    backend.close()
    assert got[1].num_tokens == 0 and got[1].targets.ids_PK.shape == (0, 4) and got[1].hidden[1].shape[0] == 0
    logits = model_f64(torch.as_tensor(rows[1][None], dtype=torch.long)).logits[0]
    np.testing.assert_array_equal(np.sort(got[0].targets.ids_PK, axis=1),
                                  np.sort(logits[:-1].topk(4).indices.numpy(), axis=1))


def test_hf_row_windows_end_at_the_row_and_token_limits_and_at_shard_boundaries():
    from teacher_cache.backend import SourceRow
    from teacher_cache.hf_backend import row_windows

    rows = [SourceRow(i, np.zeros(n, np.int32), np.zeros(n, np.int32)) for i, n in enumerate([5, 5, 5, 30, 5, 5, 5])]

    def ids(windows):
        return [[r.row_id for r in w] for w in windows]

    assert ids(row_windows(rows, 2, 1000)) == [[0, 1], [2, 3], [4, 5], [6]]
    assert ids(row_windows(rows, 10, 12)) == [[0, 1, 2], [3], [4, 5, 6]]
    assert ids(row_windows(rows, 10, 1000, rows_per_shard=3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert ids(row_windows(rows[2:], 2, 1000, rows_per_shard=3)) == [[2], [3, 4], [5], [6]]


def test_hf_backend_reads_a_stream_lazily_and_batches_each_shard_alone(llama):
    """One run over a stream of several shards' rows gives each shard the targets a
    run over that shard alone gives (same batches), reading only a window ahead."""
    from teacher_cache.backend import BackendOptions, SourceRow
    from teacher_cache.hf_backend import HFBackend

    model_dir, model_f64, _, _ = llama
    source = [SourceRow(i, ids, ids.copy()) for i, ids in enumerate(random_rows(3, 12, 5, 30))]
    spec = ShardSpec(vocab_size=VOCAB, targets=TargetSpec(k=4),
                     hidden=HiddenSpec(layers=(1,), hidden_size=model_f64.config.hidden_size))
    backend = HFBackend(spec, BackendOptions(model=str(model_dir), device="cpu", dtype="float32", rows_per_shard=3))
    pulled, pulled_at_first_result = [], None

    def stream():
        for row in source:
            pulled.append(row.row_id)
            yield row

    try:
        streamed = {}
        for trow in backend.run(stream()):
            if pulled_at_first_result is None:
                pulled_at_first_result = len(pulled)
            streamed[trow.row_id] = trow
        alone = {r.row_id: r for start in range(0, len(source), 3) for r in backend.run(source[start:start + 3])}
    finally:
        backend.close()
    # Shard 0's window, then shard 1's (one batch of lookahead), each closed by the next shard's first row.
    assert pulled_at_first_result == 7
    assert sorted(streamed) == sorted(alone) == list(range(len(source)))
    for row_id, trow in streamed.items():
        np.testing.assert_array_equal(trow.targets.ids_PK, alone[row_id].targets.ids_PK)
        np.testing.assert_array_equal(trow.targets.logits_PK, alone[row_id].targets.logits_PK)
        np.testing.assert_array_equal(trow.targets.lse_PT, alone[row_id].targets.lse_PT)
        torch.testing.assert_close(trow.hidden[1], alone[row_id].hidden[1], rtol=0, atol=0)


def test_compression_choice_reaches_the_shards_and_not_their_content(llama, tmp_path):
    from common.inspect import column_bytes

    model_dir, _, data, _ = llama
    cache(model_dir, data, tmp_path / "zstd", top_k=8, rows_per_shard=2)
    cache(model_dir, data, tmp_path / "none", top_k=8, rows_per_shard=2, compression="none")
    a, b = CacheDir(tmp_path / "zstd").read_rows(), CacheDir(tmp_path / "none").read_rows()
    assert sorted(a) == sorted(b)
    for row_id in a:
        np.testing.assert_array_equal(a[row_id].targets.ids_PK, b[row_id].targets.ids_PK)
        np.testing.assert_array_equal(a[row_id].targets.lse_PT, b[row_id].targets.lse_PT)
    for shard in sorted((tmp_path / "none").glob("shard-*.arrow")):
        assert all(col.compressed == col.uncompressed for col in column_bytes(shard))
    with pytest.raises(ValueError, match="compression must be one of"):
        cache(model_dir, data, tmp_path / "bad", top_k=8, compression="brotli")
    assert not (tmp_path / "bad").exists()


# ---- plan, dry run, bad input, refusals -----------------------------------------------

def test_dry_run_prints_plan_and_estimate_and_writes_nothing(llama, tmp_path):
    model_dir, _, data, rows = llama
    console, buf = quiet_console()
    out = tmp_path / "never"
    cfg = CacheConfig.from_flags(model=str(model_dir), data=str(data), out=str(out), top_k=8, hidden_layers=(2,),
                      rows_per_shard=2, num_workers=2, worker_index=1, dry_run=True)
    assert run_cache(cfg, console) is None
    text = buf.getvalue()
    assert not out.exists()
    assert f"{len(rows)} rows, {sum(len(r) for r in rows)} tokens" in text
    assert "2 shard(s) of 2 rows" in text and "worker 1/2: 1 shard(s)" in text
    assert "estimated storage" in text and "hidden" in text and "nothing written" in text


def _bad_inputs(root: Path, model_dir: Path):
    good = random_rows(0, 3, 5, 20)
    bad_id = [r.copy() for r in good]
    bad_id[2][4] = VOCAB
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": [r.tolist() for r in good]})}) \
        .save_to_disk(str(root / "saved"))
    pq.write_table(pa.table({"tokens": [r.tolist() for r in good]}), root / "no_ids.parquet")
    return [
        ("missing input_ids", dict(data=root / "no_ids.parquet"), ["no_ids.parquet", "input_ids"]),
        ("id >= vocab", dict(data=write_parquet(root / "bad_id.parquet", bad_id)),
         ["bad_id.parquet", "row 2", str(VOCAB)]),
        ("too long", dict(data=write_parquet(root / "long.parquet", good + random_rows(1, 1, 1100, 1101)),
                          limit_rows=None), ["long.parquet", "row 3", "1024"]),
        ("unknown split", dict(data=root / "saved", split="test"), ["saved", "'test'", "train"]),
        ("missing model", dict(data=root / "saved", model=root / "nowhere"), ["nowhere", "does not exist"]),
    ]


def test_bad_input_is_refused_before_any_model_work_or_write(llama, tmp_path, monkeypatch):
    model_dir, _, _, _ = llama

    def no_model(*a, **kw):
        raise AssertionError("a backend was built for bad input")

    monkeypatch.setattr(cache_run, "make_backend", no_model)
    for name, kw, fragments in _bad_inputs(tmp_path, model_dir):
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        kw = dict(kw)
        cfg = CacheConfig.from_flags(model=str(kw.pop("model", model_dir)), data=str(kw.pop("data")), out=str(out), **kw)
        with pytest.raises(ValueError) as err:
            run_cache(cfg, quiet_console()[0])
        message = str(err.value)
        assert "\n" not in message, name
        for fragment in fragments:
            assert fragment in message, (name, message)
        assert not out.exists(), name


def test_cli_reports_bad_input_in_one_line(llama, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    model_dir, _, data, _ = llama
    result = CliRunner().invoke(app, ["cache-teacher", "--model", str(model_dir), "--data", str(data),
                                      "--split", "train", "--out", str(tmp_path / "o"), "--hidden-layers", "9"])
    assert result.exit_code == 2
    assert "--hidden-layers [9]" in result.output and "4 layers" in result.output
    assert not (tmp_path / "o").exists()


def test_out_overlapping_the_data_or_holding_the_teacher_is_refused_before_any_work(llama, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app

    model_dir, _, _, rows = llama
    import datasets

    data = tmp_path / "data"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": [r.tolist() for r in rows]})}) \
        .save_to_disk(str(data))
    held_teacher = tmp_path / "out" / "teacher"
    shutil.copytree(model_dir, held_teacher)

    def no_work(*a, **kw):
        raise AssertionError("work started on overlapping paths")

    monkeypatch.setattr(cache_run, "prepare", no_work)
    for out, model, fragment in ((data, model_dir, f"--out {data} is the same path as --data {data}"),
                                 (data / "cache", model_dir, f"--out {data / 'cache'} lies inside --data {data}"),
                                 (tmp_path, model_dir, f"--out {tmp_path} contains --data {data}"),
                                 (tmp_path / "out", held_teacher, f"--model {held_teacher} lies inside --out")):
        with pytest.raises(ValueError) as err:
            run_cache(CacheConfig.from_flags(model=str(model), data=str(data), out=str(out)), quiet_console()[0])
        assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not (data / "cache").exists()
    result = CliRunner().invoke(app, ["cache-teacher", "--model", str(model_dir), "--data", str(data),
                                      "--out", str(data)])
    assert result.exit_code == 2 and "is the same path as --data" in result.output


def test_changing_targets_or_teacher_is_refused_without_overwrite(llama, tmp_path):
    model_dir, _, data, _ = llama
    out = tmp_path / "c"
    cache(model_dir, data, out, top_k=8, rows_per_shard=2, limit_rows=2)
    first = shard_bytes(out)
    with pytest.raises(ValueError, match="targets/hidden spec.*--overwrite"):
        cache(model_dir, data, out, top_k=4, rows_per_shard=2, limit_rows=2)
    with pytest.raises(ValueError, match="targets/hidden spec"):
        cache(model_dir, data, out, top_k=8, temperatures=(1.0,), rows_per_shard=2, limit_rows=2)
    with pytest.raises(ValueError, match="rows per shard"):
        cache(model_dir, data, out, top_k=8, rows_per_shard=1, limit_rows=2)
    save_model(build_model(tiny_llama_config(VOCAB, num_layers=2)), tmp_path / "other_config")
    with pytest.raises(ValueError, match="teacher config_hash"):
        cache(tmp_path / "other_config", data, out, top_k=8, rows_per_shard=2, limit_rows=2)
    save_model(build_model(tiny_llama_config(VOCAB), seed=99), tmp_path / "other_weights")
    with pytest.raises(ValueError, match="teacher weights_fingerprint"):
        cache(tmp_path / "other_weights", data, out, top_k=8, rows_per_shard=2, limit_rows=2)
    other_data = write_parquet(tmp_path / "other.parquet", random_rows(5, 3, 5, 20))
    with pytest.raises(ValueError, match="source fingerprint"):
        cache(model_dir, other_data, out, top_k=8, rows_per_shard=2, limit_rows=2)
    assert shard_bytes(out) == first, "a refused run changes nothing"
    cache(model_dir, data, out, top_k=4, rows_per_shard=2, limit_rows=2, overwrite=True)
    manifest = load_manifest(out)
    assert manifest.spec.targets.k == 4 and manifest.total_rows == 2
    assert ShardReader(out / manifest.shards[0].file).spec.targets.k == 4
    assert (out / MANIFEST_NAME).is_file()


def test_summary_reports_throughput_and_cost(llama, tmp_path, monkeypatch):
    model_dir, _, data, rows = llama
    monkeypatch.setattr(cache_run, "_gpus_in_use", lambda cfg: 2)
    console, buf = quiet_console()
    summary = run_cache(CacheConfig.from_flags(model=str(model_dir), data=str(data), out=str(tmp_path / "c"), top_k=4,
                                    gpu_hour_price=2.5, show_progress=False), console)
    assert summary.tokens == sum(len(r) for r in rows) and summary.rows == len(rows)
    assert summary.bytes == sum(p.stat().st_size for p in (tmp_path / "c").glob("shard-*.arrow"))
    assert math.isclose(summary.gpu_hours, summary.seconds / 3600 * 2)
    expected_cost = summary.gpu_hours * 2.5 / (summary.tokens / 1e6)
    assert math.isclose(summary.cost_per_million_tokens, expected_cost)
    assert "tokens/s" in buf.getvalue() and "per million tokens" in buf.getvalue()


def test_automatic_rows_per_shard_follows_the_raw_bytes_of_a_row():
    from teacher_cache.plan import AUTO_ROWS_PER_SHARD_RANGE, AUTO_SHARD_RAW_BYTES, auto_rows_per_shard, raw_bytes_per_token

    low, high = AUTO_ROWS_PER_SHARD_RANGE
    targets_only = ShardSpec(vocab_size=201_088, targets=TargetSpec(k=64))
    assert auto_rows_per_shard(targets_only, 4096) == high  # ~270 B/token: far below the byte target
    def fp8(layers, fraction=1.0):
        return ShardSpec(vocab_size=201_088, targets=TargetSpec(k=64), hidden=HiddenSpec(
            layers=layers, dtype="fp8", token_fraction=fraction, hidden_size=2880))
    two_layers = auto_rows_per_shard(fp8((12, 24)), 4096)
    # the shard's raw bytes land just under the target, and one more row would pass it
    per_row = raw_bytes_per_token(fp8((12, 24))) * 4096
    assert two_layers * per_row <= AUTO_SHARD_RAW_BYTES < (two_layers + 1) * per_row
    assert low < two_layers < auto_rows_per_shard(fp8((24,)), 4096) < auto_rows_per_shard(fp8((12, 24), 0.25), 4096)
    assert auto_rows_per_shard(fp8((6, 12, 18, 24)), 131_072) == low  # huge rows: the row floor
    # bf16 stores twice fp8's bytes per hidden value
    bf16 = ShardSpec(vocab_size=201_088, targets=TargetSpec(k=64), hidden=HiddenSpec(
        layers=(12, 24), dtype="bf16", hidden_size=2880))
    assert raw_bytes_per_token(bf16) - raw_bytes_per_token(targets_only) == 2 * 2 * 2880


def test_raw_bytes_per_token_is_what_encode_row_produces():
    """The automatic shard size rests on `raw_bytes_per_token`: here it is checked
    against the cells `encode_row` really makes (top-k: within the per-row constants;
    sampled: an upper bound)."""
    from common.shard_format import encode_row
    from peaked import teacher_row
    from teacher_cache.plan import raw_bytes_per_token

    def cell_bytes(cells: dict) -> int:
        return sum(len(v) if isinstance(v, bytes) else v.nbytes for name, v in cells.items() if name != "row_id")

    length = 400
    fp8 = HiddenSpec(layers=(1, 3), dtype="fp8", hidden_size=64)
    row = teacher_row(ShardSpec(vocab_size=5000, targets=TargetSpec(k=16), hidden=fp8), 0, length, seed=1).row
    for hidden in (HiddenSpec(), fp8, dataclasses.replace(fp8, dtype="bf16")):
        spec = ShardSpec(vocab_size=5000, targets=TargetSpec(k=16), hidden=hidden)
        actual = cell_bytes(encode_row(row, spec)) / length
        assert actual == pytest.approx(raw_bytes_per_token(spec), rel=5e-3), hidden
    sampled = ShardSpec(vocab_size=5000, targets=TargetSpec(mode="sampled", num_samples=50))
    row = teacher_row(sampled, 0, length, seed=1).row
    assert cell_bytes(encode_row(row, sampled)) / length <= raw_bytes_per_token(sampled)


def test_rows_per_shard_is_checked_and_sized_from_the_mean_row(tmp_path):
    from types import SimpleNamespace

    from teacher_cache.cache_run import CacheConfig, resolve_rows_per_shard
    from teacher_cache.plan import auto_rows_per_shard

    spec = ShardSpec(vocab_size=201_088, targets=TargetSpec(k=64), hidden=HiddenSpec(
        layers=(12, 24), dtype="fp8", hidden_size=2880))
    source = SimpleNamespace(num_rows=100, num_tokens=100 * 2048)  # rows of 2,048 tokens on average
    cfg = lambda n: CacheConfig.from_flags(model="m", data="d", out=str(tmp_path / "new"), rows_per_shard=n)  # noqa: E731
    with pytest.raises(ValueError, match="--rows-per-shard must be >= 1"):
        resolve_rows_per_shard(cfg(-1), spec, source)
    assert resolve_rows_per_shard(cfg(7), spec, source) == 7
    auto = resolve_rows_per_shard(cfg(0), spec, source)
    assert auto == auto_rows_per_shard(spec, 2048) > auto_rows_per_shard(spec, 4096)  # not from the total
