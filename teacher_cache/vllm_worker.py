"""Teacher capture inside vLLM's worker process (the vllm backend's device side).

vLLM runs the teacher; this module plugs into its V1 worker at two named seams
and turns each engine step into targets without per-token Python objects:

* `CaptureWorkerMixin.load_model`: right after the weights load and before the
  first forward (which is when torch.compile traces the model and CUDA graphs
  are captured), it turns on vLLM's aux-hidden-state outputs (the EAGLE-3
  mechanism) for the requested layers. The compiled graph then returns
  `(final normed hidden, [residual stream of each layer])`, so the capture is
  compile- and CUDA-graph-safe; no forward hooks are used.
* `model_runner._model_forward` (an instance attribute, wrapped once): the
  runner's documented "override for model execution" method. After each
  forward, `StepCapture.on_forward` maps the flattened batch to requests
  through the runner's input batch (`req_ids`, `query_start_loc`,
  `num_computed_tokens_cpu`), runs `compute_targets` on the device (chunked
  `compute_logits`, top-k + log-sum-exp, or sampling), and copies the results
  to host buffers at each request's token offset. Chunked prefill splits a
  prompt over several steps and batch order is not request order; both are
  handled by that mapping. Rows are identified by the row id carried in the
  request's `SamplingParams.extra_args`, never by vLLM's request id.

The driver collects finished rows with `collective_rpc("vpmoe_take_finished")`
after each engine step.

Layer numbering: vLLM's aux id i is `hidden + residual` after decoder layer i
(0-based index i - 1), i.e. the residual stream leaving layer i (1-based),
before the final norm: the same numbering as `HiddenSpec.layers`.

The worker classes are picked with `LLM(worker_cls=...)`: `CudaCaptureWorker`
or `CpuCaptureWorker` (built on first access, so importing this module does not
import vLLM's worker modules). `worker_extension_cls` cannot do this job: vLLM
appends the extension as the last base class and refuses names the worker
already has, so it can add RPC methods but cannot act between model load and
compilation.

Shape suffixes: F flattened tokens of one step, N target positions of a step,
H kept hidden positions (of a step or of a row), D hidden size, K top-k width,
T temperatures, M draws per position, S flattened sampled entries, L tokens of
a row, P = L - 1 target positions of a row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from common.codec import quantize_fp8
from common.spec import ShardSpec, hidden_positions
from common.targets import RowTargets
from teacher_cache.targets import DEFAULT_CHUNK, SelectionConfig, compute_targets, selection

# Key of `LLM(additional_config=...)` holding the capture settings; vLLM hashes
# additional_config into its compile cache key, so a cached graph built for
# other aux layers is never reused.
CAPTURE_CONFIG_KEY = "vpmoe_capture"
# Key of `SamplingParams.extra_args` holding the row id of a request.
ROW_ID_KEY = "vpmoe_row_id"

# What the capture reads from vLLM's V1 model runner (the same in 0.26 and 0.32).
_RUNNER_SEAMS = ("_model_forward", "input_batch", "query_start_loc", "requests", "model", "model_config")


@dataclass(frozen=True)
class CaptureConfig:
    spec: ShardSpec
    logits_chunk: int = DEFAULT_CHUNK
    selection: SelectionConfig = SelectionConfig()

    def to_dict(self) -> dict:
        return {"spec": self.spec.to_dict(), "logits_chunk": int(self.logits_chunk),
                "selection": dataclasses.asdict(self.selection)}

    @classmethod
    def from_dict(cls, d: dict) -> "CaptureConfig":
        return cls(spec=ShardSpec.from_dict(d["spec"]), logits_chunk=int(d["logits_chunk"]),
                   selection=SelectionConfig(**d["selection"]))


@dataclass
class StepPiece:
    """Where a step's results go: one request's slice of the flattened batch."""

    row: "RowCapture"
    start: int  # prompt position of the first token of the slice
    num_tokens: int  # tokens of the slice that lie inside the prompt
    num_targets: int  # of those, positions that have a next token
    target_offset: int  # offset into the step's target rows
    hidden_slots_h: np.ndarray  # destination rows in row.hidden of this slice's kept positions
    hidden_offset: int  # offset into the step's kept hidden rows


@dataclass
class PendingStep:
    """A step's results on their way to the host (pinned memory on CUDA)."""

    pieces: list[StepPiece]
    host: dict[str, torch.Tensor]
    event: object | None = None  # torch.cuda.Event, recorded after the copies


class RowCapture:
    """One request's targets and kept hidden states, filled at token offsets.

    A request may be recomputed from an earlier position (vLLM preemption);
    writes are by position, so a recompute overwrites rather than appends.
    """

    def __init__(self, req_id: str, row_id: int, num_tokens: int, spec: ShardSpec, hidden_dtype: torch.dtype):
        self.req_id = req_id
        self.row_id = row_id
        self.num_tokens = num_tokens
        self.next_position = 0
        tspec, hspec = spec.targets, spec.hidden
        self.targets = selection(tspec).row_buffer(tspec, row_id, max(num_tokens - 1, 0))
        self.layers = tuple(sorted(set(hspec.layers)))
        if self.layers:
            self.kept_H = hidden_positions(row_id, num_tokens, hspec.token_fraction, hspec.seed)
            self.slot_of_position_L = np.full(num_tokens, -1, dtype=np.int64)
            self.slot_of_position_L[self.kept_H] = np.arange(len(self.kept_H))
            # Normal (not inference-mode) tensors: the driver may use them freely.
            # fp8 caches arrive quantized on the device: bytes + one scale per token.
            self.fp8 = hspec.dtype == "fp8"
            store_dtype = torch.uint8 if self.fp8 else hidden_dtype
            with torch.inference_mode(False):
                self.hidden = {layer: torch.empty((len(self.kept_H), hspec.hidden_size), dtype=store_dtype)
                               for layer in self.layers}
                self.hidden_scale = ({layer: torch.empty(len(self.kept_H), dtype=torch.float32)
                                      for layer in self.layers} if self.fp8 else {})
        else:
            self.kept_H = np.zeros(0, dtype=np.int32)
            self.hidden = {}
            self.hidden_scale = {}
            self.fp8 = False

    @property
    def done(self) -> bool:
        return self.next_position == self.num_tokens

    def kept_slots(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Kept positions in [start, stop): (offsets from start, destination slots)."""
        if not self.layers:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        slots = self.slot_of_position_L[start:stop]
        offsets = np.nonzero(slots >= 0)[0]
        return offsets, slots[offsets]

    def finish(self) -> dict:
        """The row's `RowTargets` and hidden tensors (in the model's dtype, or fp8 with scales)."""
        out: dict = {"row_id": self.row_id, "num_tokens": self.num_tokens, "targets": self.targets.finish(),
                     "hidden": {layer: (h.view(torch.float8_e4m3fn) if self.fp8 else h)
                                for layer, h in self.hidden.items()}}
        if self.fp8:
            out["hidden_scales"] = dict(self.hidden_scale)
        return out


@dataclass
class StepCapture:
    """Per-step capture state of one worker; created by `install`."""

    runner: object
    config: CaptureConfig
    hidden_dtype: torch.dtype
    active: dict[str, RowCapture] = field(default_factory=dict)  # vLLM request id -> row
    pending: list[PendingStep] = field(default_factory=list)
    finished: list[RowCapture] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0

    @classmethod
    def install(cls, runner, config: CaptureConfig) -> "StepCapture":
        missing = [name for name in _RUNNER_SEAMS if not hasattr(runner, name)]
        if missing or getattr(runner, "use_v2_model_runner", False):
            raise RuntimeError(f"vLLM's model runner {type(runner).__name__} lacks {missing or 'the V1 layout'}; "
                               "the capture supports the V1 GPUModelRunner family (vLLM 0.26-0.32)")
        model = runner.model
        layers = tuple(sorted(set(config.spec.hidden.layers)))
        if layers:
            if not hasattr(model, "set_aux_hidden_state_layers"):
                raise ValueError(f"teacher {type(model).__name__} does not expose aux hidden states in vLLM; "
                                 "store no hidden layers or use the hf backend")
            # Before the first forward: torch.compile traces the aux outputs into the graph.
            model.set_aux_hidden_state_layers(layers)
            runner.use_aux_hidden_state_outputs = True
        capture = cls(runner=runner, config=config, hidden_dtype=runner.model_config.dtype)
        forward = runner._model_forward

        def capturing_forward(*args, **kwargs):
            output = forward(*args, **kwargs)
            capture.on_forward(output)
            return output

        runner._model_forward = capturing_forward
        return capture

    def _row(self, req_id: str, prompt_len: int) -> RowCapture:
        row = self.active.get(req_id)
        if row is None:
            extra = getattr(self.runner.requests[req_id].sampling_params, "extra_args", None) or {}
            if ROW_ID_KEY not in extra:
                raise RuntimeError(f"request {req_id} carries no {ROW_ID_KEY}; submit rows through VllmBackend")
            row = RowCapture(req_id, int(extra[ROW_ID_KEY]), prompt_len, self.config.spec, self.hidden_dtype)
            self.active[req_id] = row
        return row

    def _plan(self, num_flat: int) -> tuple[list[StepPiece], np.ndarray, np.ndarray]:
        """Map the flattened batch to requests: pieces, flat rows of targets and of kept hidden states."""
        batch = self.runner.input_batch
        num_reqs = batch.num_reqs
        req_ids = batch.req_ids[:num_reqs]
        query_start = np.asarray(self.runner.query_start_loc.np[:num_reqs + 1], dtype=np.int64)
        computed = np.asarray(batch.num_computed_tokens_cpu[:num_reqs], dtype=np.int64)
        assert query_start[-1] <= num_flat, (query_start[-1], num_flat)
        pieces, target_rows, hidden_rows = [], [], []
        num_targets = num_hidden = 0
        for j, req_id in enumerate(req_ids):
            prompt_len = len(self.runner.requests[req_id].prompt_token_ids)
            start, flat = int(computed[j]), int(query_start[j])
            n = min(int(query_start[j + 1]) - flat, prompt_len - start)  # prompt tokens only
            if n <= 0:
                continue
            row = self._row(req_id, prompt_len)
            m = max(0, min(start + n, row.num_tokens - 1) - start)  # the last prompt token has no target
            offsets, slots = row.kept_slots(start, start + n)
            pieces.append(StepPiece(row, start, n, m, num_targets, slots, num_hidden))
            target_rows.append(flat + np.arange(m))
            hidden_rows.append(flat + offsets)
            num_targets += m
            num_hidden += len(offsets)
        cat = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        return pieces, cat(target_rows), cat(hidden_rows)

    @torch.inference_mode()
    def on_forward(self, output) -> None:
        hidden_FD, aux = (output[0], output[1]) if isinstance(output, tuple) else (output, [])
        if self.runner.input_batch.num_reqs == 0:
            return
        # The forward just queued keeps the GPU busy while the host sorts the
        # previous step's results into their rows.
        self._drain()
        pieces, target_rows_N, hidden_rows_H = self._plan(hidden_FD.shape[0])
        if not pieces:
            return
        device = hidden_FD.device
        spec = self.config.spec
        uniforms = [p.row.targets.uniforms(p.start, p.start + p.num_targets) for p in pieces]
        uniforms_NM = None if uniforms[0] is None else _to_device(np.concatenate(uniforms), device)
        rows_N = _to_device(target_rows_N, device)
        targets = compute_targets(hidden_FD.index_select(0, rows_N), self._logits, spec.targets,
                                  uniforms_NM, self.config.logits_chunk, self.config.selection)
        device_out = selection(spec.targets).host_arrays(targets)
        if spec.hidden.layers:
            aux_layers = sorted(set(spec.hidden.layers))  # the order vLLM returns them in
            assert len(aux) == len(aux_layers), (len(aux), aux_layers)
            rows_H = _to_device(hidden_rows_H, device)
            for layer, aux_FD in zip(aux_layers, aux):
                hidden_HD = aux_FD.index_select(0, rows_H)
                if spec.hidden.dtype == "fp8":
                    # Quantized here: half the host copy, and no fp8 conversion on the CPU.
                    q_HD, scale_H = quantize_fp8(hidden_HD)
                    device_out[f"hidden_{layer}"] = q_HD.view(torch.uint8)
                    device_out[f"hidden_scale_{layer}"] = scale_H
                else:
                    device_out[f"hidden_{layer}"] = hidden_HD
        self.pending.append(self._to_host(pieces, device_out))
        self.steps += 1
        self.tokens += sum(p.num_tokens for p in pieces)
        if device.type == "cpu":
            self._drain()

    def _logits(self, hidden_nD: torch.Tensor) -> torch.Tensor:
        logits_nV = self.runner.model.compute_logits(hidden_nD)
        assert logits_nV is not None, "logits are gathered on another rank (tensor parallelism is not supported)"
        if logits_nV.shape[-1] != self.config.spec.vocab_size:
            raise ValueError(f"teacher logits have {logits_nV.shape[-1]} columns, the cache's vocabulary is "
                             f"{self.config.spec.vocab_size}")
        return logits_nV

    @staticmethod
    def _to_host(pieces: list[StepPiece], device_out: dict[str, torch.Tensor]) -> PendingStep:
        if next(iter(device_out.values())).device.type == "cpu":
            return PendingStep(pieces, device_out)
        # Pinned destinations come from PyTorch's caching host allocator, which
        # does not hand a block out again before its copy has completed.
        host = {}
        for name, t in device_out.items():
            host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host[name].copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingStep(pieces, host, event)

    def _drain(self) -> None:
        """Move step results into their rows, in step order, once their copies
        have landed; finished rows go to `finished`."""
        while self.pending:
            step = self.pending.pop(0)
            if step.event is not None:
                step.event.synchronize()
            self._distribute(step)

    def _distribute(self, step: PendingStep) -> None:
        host = step.host
        targets_of = selection(self.config.spec.targets).step_slices(host)
        for piece in step.pieces:
            row = piece.row
            row.targets.write(piece.start, targets_of(piece.target_offset, piece.target_offset + piece.num_targets))
            if len(piece.hidden_slots_h):
                slots = _slots(piece.hidden_slots_h)
                h0, h1 = piece.hidden_offset, piece.hidden_offset + len(piece.hidden_slots_h)
                for layer in row.layers:
                    row.hidden[layer][slots] = host[f"hidden_{layer}"][h0:h1]
                    if row.fp8:
                        row.hidden_scale[layer][slots] = host[f"hidden_scale_{layer}"][h0:h1]
            row.next_position = piece.start + piece.num_tokens
            if row.done:
                self.finished.append(row)
                del self.active[row.req_id]

    def take_finished(self, final: bool = False) -> list[dict]:
        """Rows completed so far. Between steps the last step's results stay
        pending (they are sorted in during the next forward); `final` waits
        for and sorts in everything."""
        if final:
            self._drain()
        done, self.finished = self.finished, []
        return [row.finish() for row in done]

    def reset(self) -> None:
        """Forget partial rows (after an aborted run)."""
        self._drain()
        self.active.clear()
        self.finished.clear()


def _slots(slots_h: np.ndarray) -> slice | torch.Tensor:
    """Destination rows of a piece's kept hidden states (ascending, distinct by
    construction): a slice when they are consecutive, as with every position
    kept. A slice copy on this thread (the engine's) runs ~10x faster than a
    scatter of the same megabytes."""
    first, count = int(slots_h[0]), len(slots_h)
    if int(slots_h[-1]) - first + 1 == count:
        return slice(first, first + count)
    return torch.from_numpy(slots_h)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if device.type == "cpu":
        return tensor
    # From pinned memory the copy is queued behind the forward instead of
    # making the host wait for it.
    return tensor.pin_memory().to(device, non_blocking=True)


def pack_arrays(result: dict) -> dict:
    """A finished row as msgpack-native values (bytes, not tensors), for an
    engine core in another process: vLLM serialises RPC results without pickle
    only when they are built from native types."""
    targets = result["targets"]
    packed = {"row_id": int(result["row_id"]), "num_tokens": int(result["num_tokens"]),
              "targets": {f.name: _pack_one(torch.from_numpy(np.ascontiguousarray(getattr(targets, f.name))))
                          for f in dataclasses.fields(targets)}}
    for key in ("hidden", "hidden_scales"):
        if key in result:
            packed[key] = {int(layer): _pack_one(t) for layer, t in result[key].items()}
    return packed


def unpack_arrays(packed: dict, row_targets: type[RowTargets]) -> dict:
    """The inverse of `pack_arrays`; `row_targets`: the cache's kind's `RowTargets` class."""
    out = {"row_id": packed["row_id"], "num_tokens": packed["num_tokens"],
           "targets": row_targets(**{name: _unpack_one(blob).numpy() for name, blob in packed["targets"].items()})}
    for key in ("hidden", "hidden_scales"):
        if key in packed:
            out[key] = {int(layer): _unpack_one(blob) for layer, blob in packed[key].items()}
    return out


def _pack_one(t: torch.Tensor) -> list:
    # Empty tensors may carry zero strides, which a byte view refuses.
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return [str(t.dtype).removeprefix("torch."), list(t.shape), data]


def _unpack_one(blob: list) -> torch.Tensor:
    dtype_name, shape, data = blob
    dtype = getattr(torch, dtype_name)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.zeros(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


class CaptureWorkerMixin:
    """Capture methods of the worker; mixed in front of vLLM's worker class."""

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        raw = (self.vllm_config.additional_config or {}).get(CAPTURE_CONFIG_KEY)
        if raw is None:
            raise RuntimeError(f"{type(self).__name__} needs additional_config[{CAPTURE_CONFIG_KEY!r}]")
        if self.parallel_config.tensor_parallel_size != 1 or self.parallel_config.pipeline_parallel_size != 1:
            raise ValueError("the vllm capture runs one engine per GPU (tensor/pipeline parallel size 1)")
        if getattr(self, "use_v2_model_runner", False):
            raise ValueError("the vllm capture needs the V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER")
        self.vpmoe_capture = StepCapture.install(self.model_runner, CaptureConfig.from_dict(raw))

    def vpmoe_take_finished(self, final: bool = False, packed: bool = False) -> list[dict]:
        rows = self.vpmoe_capture.take_finished(final)
        return [pack_arrays(r) for r in rows] if packed else rows

    def vpmoe_reset(self) -> None:
        self.vpmoe_capture.reset()

    def vpmoe_stats(self) -> dict:
        return {"steps": self.vpmoe_capture.steps, "tokens": self.vpmoe_capture.tokens,
                "active": len(self.vpmoe_capture.active)}


def __getattr__(name: str):
    # Built on first access: the module stays importable without vLLM's worker code.
    if name == "CudaCaptureWorker":
        from vllm.v1.worker.gpu_worker import Worker

        cls = type("CudaCaptureWorker", (CaptureWorkerMixin, Worker), {"__module__": __name__})
    elif name == "CpuCaptureWorker":
        from vllm.v1.worker.cpu_worker import CPUWorker

        cls = type("CpuCaptureWorker", (CaptureWorkerMixin, CPUWorker), {"__module__": __name__})
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = cls
    return cls
