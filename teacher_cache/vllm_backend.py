"""The vllm teacher backend (the production path): driver side.

An in-process `vllm.LLM` prefills token-id prompts with `max_tokens=1` and
prefix caching off; the capture itself happens inside vLLM's worker (see
`teacher_cache.vllm_worker`), which computes targets and the kept hidden states
on the device during each engine step. This side feeds rows to the engine,
collects each finished row's targets (the kind's `RowTargets`) and hidden
states, and makes them `TeacherRow`s with the shared `teacher_row`.

The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0 unless
the caller set it), so finished rows reach the driver as the worker's own
arrays. If the engine core runs in another process, rows travel as raw bytes
(vLLM's msgpack path, no pickle).

Tensor parallelism is not supported: run one engine per GPU (`--gpus`), which
is also the faster route for prefill-only work; a teacher that does not fit
one GPU needs the hf backend or a larger GPU.
"""

from __future__ import annotations

import gc
import os
from typing import Iterable, Iterator

import numpy as np
import torch

from common.causal_lm import DTYPES_BY_NAME, dtype_name
from common.shard_format import TeacherRow
from common.spec import ShardSpec
from teacher_cache.backend import (BackendOptions, SourceRow, TeacherInfo, host_hidden, kept_positions,
                                   read_teacher_info, teacher_row)
from teacher_cache.targets import selection
from teacher_cache.vllm_worker import CAPTURE_CONFIG_KEY, ROW_ID_KEY, CaptureConfig, unpack_arrays

# vLLM takes torch's dtype names; "half" and "float" are its own aliases.
_DTYPES = {"auto": "auto", **{name: dtype_name(dtype) for name, dtype in DTYPES_BY_NAME.items()},
           "half": "float16", "float": "float32"}
# Tokens kept queued in the engine beyond one step's budget, so that the
# scheduler always has the next prompts at hand and steps stay full.
_QUEUE_STEPS = 4
_MULTIPROC_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


def check_spec_against_teacher(spec: ShardSpec, info: TeacherInfo, model: str) -> None:
    if spec.vocab_size != info.vocab_size:
        raise ValueError(f"model {model}: vocabulary {info.vocab_size} != the cache spec's {spec.vocab_size}")
    hidden = spec.hidden
    if hidden.layers:
        if hidden.hidden_size != info.hidden_size:
            raise ValueError(f"model {model}: hidden size {info.hidden_size} != the cache spec's {hidden.hidden_size}")
        too_deep = [layer for layer in hidden.layers if layer > info.num_layers]
        if too_deep:
            raise ValueError(f"model {model}: hidden layer(s) {too_deep} beyond its {info.num_layers} layers")


def engine_kwargs(spec: ShardSpec, options: BackendOptions, info: TeacherInfo, worker_cls: str) -> dict:
    """Arguments of `vllm.LLM` for a capture engine."""
    if options.dtype not in _DTYPES:
        raise ValueError(f"dtype {options.dtype!r} is not one of {', '.join(_DTYPES)}")
    return dict(
        model=options.model,
        # Never the pickle formats (pytorch_model.bin); "dummy": random weights at the config's shape.
        load_format="dummy" if options.load_format == "dummy" else "safetensors",
        skip_tokenizer_init=True,  # prompts are token ids; the teacher's tokenizer is never needed
        enable_prefix_caching=False,  # every position must be computed, never served from cache
        dtype=_DTYPES[options.dtype],
        # One engine per GPU (`--gpus`): the capture does not merge top-k across vocabulary shards.
        tensor_parallel_size=1,
        trust_remote_code=options.trust_remote_code,
        max_num_batched_tokens=options.max_tokens_per_batch,
        gpu_memory_utilization=options.gpu_memory_utilization,
        enforce_eager=options.enforce_eager,
        max_model_len=info.max_context,
        worker_cls=worker_cls,
        additional_config={CAPTURE_CONFIG_KEY: CaptureConfig(spec, options.logits_chunk, options.selection).to_dict()},
        seed=0,
    )


def capture_worker_cls(device: str) -> str:
    """Qualified name of the capture worker for vLLM's platform; checks `device` against it."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        if device not in ("auto", "cpu"):
            raise ValueError(f"device {device!r}: this vLLM build runs on the CPU only")
        return "teacher_cache.vllm_worker.CpuCaptureWorker"
    if current_platform.is_cuda():
        if device not in ("auto", "cuda", "cuda:0"):
            raise ValueError(f"device {device!r}: the vllm backend uses one GPU per engine; pick it with "
                             "CUDA_VISIBLE_DEVICES or --gpus")
        return "teacher_cache.vllm_worker.CudaCaptureWorker"
    raise ValueError(f"the vllm backend supports CUDA and CPU builds of vLLM, not {current_platform.device_name}")


def _sampling_params(row_id: int):
    from vllm import SamplingParams

    # One greedy token: the engine's own sampling is the cheapest possible.
    return SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, extra_args={ROW_ID_KEY: int(row_id)})


class VllmBackend:
    """`TeacherBackend` on vLLM. `engine_overrides` are extra `vllm.LLM` arguments."""

    def __init__(self, spec: ShardSpec, options: BackendOptions, engine_overrides: dict | None = None):
        self.spec, self.options = spec, options
        self.info = read_teacher_info(options.model, options.trust_remote_code)
        check_spec_against_teacher(spec, self.info, options.model)
        # Engine core in this process: finished rows reach us as the worker's
        # own arrays instead of being serialised (the caller may choose otherwise).
        os.environ.setdefault(_MULTIPROC_ENV, "0")
        self._packed = os.environ[_MULTIPROC_ENV] != "0"
        from vllm import LLM

        kwargs = engine_kwargs(spec, options, self.info, capture_worker_cls(options.device))
        kwargs.update(engine_overrides or {})
        self.llm = LLM(**kwargs)
        self._engine = self.llm.llm_engine
        self._submitted = 0

    def _check_row(self, row: SourceRow, seen: set[int]) -> None:
        """ValueError for a row the engine cannot take or one given twice; `seen` collects row ids."""
        if row.row_id in seen:
            raise ValueError(f"row {row.row_id} is given twice")
        seen.add(row.row_id)
        context = self._engine.model_config.max_model_len
        limit = context - 1  # vLLM keeps one slot for the sampled token
        ids = np.asarray(row.input_ids)
        if ids.ndim != 1 or np.asarray(row.labels).shape != ids.shape:
            raise ValueError(f"row {row.row_id}: input_ids and labels must be 1-D of equal length")
        if len(ids) > limit:
            raise ValueError(f"row {row.row_id} has {len(ids)} tokens; the vllm backend takes at most {limit} "
                             f"(engine context {context})")
        if len(ids) and (ids.min() < 0 or ids.max() >= self.info.vocab_size):
            raise ValueError(f"row {row.row_id}: token id outside the teacher's vocabulary "
                             f"[0, {self.info.vocab_size})")

    def run(self, rows: Iterable[SourceRow]) -> Iterator[TeacherRow]:
        """TeacherRows in completion order. `rows` is read lazily, as the engine
        has room: a few steps' worth of prompts stay queued, each row checked
        as it is submitted, so one call can stream a whole run's rows."""
        rows = iter(rows)
        seen: set[int] = set()
        in_flight: dict[int, tuple[str, SourceRow]] = {}
        in_flight_tokens = 0
        budget = _QUEUE_STEPS * self.options.max_tokens_per_batch
        exhausted = False
        try:
            while True:
                while not exhausted and (not in_flight or in_flight_tokens < budget):
                    row = next(rows, None)
                    if row is None:
                        exhausted = True
                        break
                    self._check_row(row, seen)
                    if row.num_tokens == 0:  # vLLM refuses empty prompts; such a row holds nothing to compute
                        yield self._teacher_row(row, None)
                        continue
                    in_flight[row.row_id] = (self._submit(row), row)
                    in_flight_tokens += row.num_tokens
                if not in_flight:  # the stream is exhausted and every row returned
                    return
                self._engine.step()
                idle = not self._engine.has_unfinished_requests()
                results = self._take_finished(final=idle)
                for result in results:
                    request_id, row = in_flight.pop(result["row_id"])
                    in_flight_tokens -= row.num_tokens
                    yield self._teacher_row(row, result)
                if idle and in_flight:  # every submitted request has finished: these are lost
                    raise RuntimeError(f"vLLM finished without returning rows {sorted(in_flight)[:8]}")
        finally:
            if in_flight:  # stopped early (error, bad row, or the consumer closed the generator)
                self._engine.abort_request([request_id for request_id, _ in in_flight.values()])
                self.llm.collective_rpc("vpmoe_reset")

    def _submit(self, row: SourceRow) -> str:
        request_id = f"vpmoe-{self._submitted}-{row.row_id}"
        self._submitted += 1
        self._engine.add_request(request_id, {"prompt_token_ids": np.asarray(row.input_ids).tolist()},
                                 _sampling_params(row.row_id))
        return request_id

    def _take_finished(self, final: bool) -> list[dict]:
        results = self.llm.collective_rpc("vpmoe_take_finished", args=(final, self._packed))[0]
        return [unpack_arrays(r, self.spec.targets.kind.row_targets) for r in results] if self._packed else results

    def _teacher_row(self, row: SourceRow, result: dict | None) -> TeacherRow:
        """The worker's finished row (None: an empty row, never sent to the engine) as a TeacherRow."""
        spec = self.spec
        if result is not None and result["num_tokens"] != row.num_tokens:
            raise RuntimeError(f"row {row.row_id}: the engine saw {result['num_tokens']} tokens, "
                               f"the source has {row.num_tokens}")
        if result is None:
            result = _empty_result(row, spec)
        hidden_HD, scales_H = host_hidden(result["hidden"], spec, result.get("hidden_scales"))
        kept_H = kept_positions(row, spec) if spec.hidden.layers else None
        return teacher_row(row, result["targets"], hidden_HD, scales_H, kept_H, spec)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = self._engine = None
        shutdown = getattr(llm.llm_engine.engine_core, "shutdown", None)
        if shutdown is not None:
            shutdown()
        del llm
        gc.collect()
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        # Lets a later engine in this process set up its own process groups.
        cleanup_dist_env_and_memory()


def _empty_result(row: SourceRow, spec: ShardSpec) -> dict:
    """What the worker returns for a row of no tokens."""
    t, h = spec.targets, spec.hidden
    return {"targets": selection(t).row_buffer(t, row.row_id, 0).finish(),
            "hidden": {layer: torch.zeros((0, h.hidden_size)) for layer in h.layers}}
