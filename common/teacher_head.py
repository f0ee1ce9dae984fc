"""Where a teacher's final norm and lm_head live, and their fingerprint: what a cache
records so that the trainer can rebuild the teacher's full distribution from the
cached last-layer hidden state (`logits = lm_head(final_norm(h_last))`, `kl_mode: dense`).

`cache-teacher --dense-from-last-layer` calls `locate_teacher_head` on the teacher's
model directory and stores the result (`TeacherHeadRecord.to_dict`) as the manifest's
`dense_head` section; the trainer calls `load_teacher_head`, which refuses tensors
whose bytes no longer hash to the recorded fingerprint. Only safetensors files are
read (their header is JSON, their data raw bytes; nothing is unpickled).

Shape suffixes: V vocabulary, E teacher width.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common.json_check import check_json
from common.model_files import safetensors_files

# Tensor names tried for each part, in order (Llama, Qwen, Mistral, GPT-OSS and most HF causal LMs).
LM_HEAD_NAMES = ("lm_head.weight",)
TIED_EMBEDDING_NAMES = ("model.embed_tokens.weight",)
NORM_NAMES = ("model.norm.weight",)
# Config keys of heads that are not a plain RMSNorm + linear map (softcapping, logit scaling).
_UNSUPPORTED_CONFIG_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class TensorLocation:
    file: str  # safetensors file name inside the model directory
    tensor: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, e.g. BF16


@dataclass(frozen=True)
class TeacherHeadRecord:
    """The manifest's `dense_head` section."""

    model_dir: str  # absolute path of the teacher's model directory when the cache was written
    layer: int  # the cached hidden layer that feeds the head: the teacher's last (1-based)
    norm: TensorLocation  # the final RMSNorm's weight [E]
    lm_head: TensorLocation  # [V, E]
    norm_eps: float
    fingerprint: str  # sha256 over both tensors' names, dtypes, shapes and stored bytes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "TeacherHeadRecord":
        try:
            check_json(d, cls, "dense_head")
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
        parts = {key: TensorLocation(**dict(d[key], shape=tuple(d[key]["shape"]))) for key in ("norm", "lm_head")}
        return cls(**{**d, **parts})

    def describe(self) -> str:
        return (f"layer {self.layer} -> {self.norm.tensor} {list(self.norm.shape)} + {self.lm_head.tensor} "
                f"{list(self.lm_head.shape)} {self.lm_head.dtype} in {self.model_dir} "
                f"(sha256 {self.fingerprint[:12]}...)")


@dataclass
class TeacherHead:
    """The loaded, frozen head: logits_CV = (rmsnorm(h_CE) * norm_weight_E) @ lm_head_VE.T."""

    norm_weight_E: torch.Tensor
    lm_head_VE: torch.Tensor
    norm_eps: float

    def to(self, device=None, dtype=None) -> "TeacherHead":
        return TeacherHead(self.norm_weight_E.to(device=device, dtype=dtype),
                           self.lm_head_VE.to(device=device, dtype=dtype), self.norm_eps)

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head_VE.shape[0])

    @property
    def width(self) -> int:
        return int(self.lm_head_VE.shape[1])

    def logits(self, hidden_CE: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
        """The teacher's logits [C, V] in compute_dtype from its last-layer residual stream."""
        # The norm in at least float32, as HF's RMSNorms do, then the matmul in the head's own dtype.
        norm_dtype = torch.promote_types(compute_dtype, torch.float32)
        h_CE = hidden_CE.to(norm_dtype)
        h_CE = h_CE * torch.rsqrt(h_CE.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        normed_CE = (self.norm_weight_E.to(norm_dtype) * h_CE).to(self.lm_head_VE.dtype)
        return torch.nn.functional.linear(normed_CE, self.lm_head_VE).to(compute_dtype)


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(the header's tensor table, offset of the data section) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a safetensors file (header is not JSON: {exc})") from exc
    header.pop("__metadata__", None)
    return header, 8 + length


def _tensor_table(model_dir: Path) -> dict[str, str]:
    """tensor name -> safetensors file (relative to the directory), for every tensor of the model
    directory (its index checked as the student's is: no file outside it, none missing)."""
    root = model_dir.resolve()
    files = safetensors_files(model_dir, "--dense-from-last-layer: teacher")
    return {name: str(f.resolve().relative_to(root)) for f in files for name in safetensors_header(f)[0]}


def _locate(model_dir: Path, table: dict[str, str], name: str) -> TensorLocation:
    header, _ = safetensors_header(model_dir / table[name])
    entry = header[name]
    return TensorLocation(file=table[name], tensor=name, shape=tuple(int(s) for s in entry["shape"]),
                          dtype=str(entry["dtype"]))


def locate_teacher_head(model_dir: str | Path, num_layers: int, vocab_size: int,
                        hidden_size: int) -> TeacherHeadRecord:
    """The record of a local teacher directory's final norm and lm_head; ValueError naming the
    directory when the head is not a plain RMSNorm + linear map."""
    model_dir = Path(model_dir).expanduser().resolve()
    what = f"--dense-from-last-layer: teacher {model_dir}"
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{what}: needs a local model directory with a config.json (its final norm and "
                         "lm_head are read at training time)")
    config = json.loads((model_dir / "config.json").read_text())
    config = {**config, **config.get("text_config", {})}
    odd = [key for key in _UNSUPPORTED_CONFIG_KEYS if config.get(key) not in (None, 1, 1.0)]
    if odd or str(config.get("model_type", "")).startswith("gemma"):
        raise ValueError(f"{what}: the head is not a plain RMSNorm + lm_head ({', '.join(odd) or 'gemma norm'}); "
                         "dense targets cannot rebuild its logits")
    if "rms_norm_eps" not in config:
        raise ValueError(f"{what}: config.json has no rms_norm_eps (the final norm must be an RMSNorm)")
    table = _tensor_table(model_dir)
    head_names = LM_HEAD_NAMES + (TIED_EMBEDDING_NAMES if config.get("tie_word_embeddings") else ())
    head = next((n for n in head_names if n in table), None)
    norm = next((n for n in NORM_NAMES if n in table), None)
    if head is None or norm is None:
        missing = [f"one of {list(names)}" for names, found in ((head_names, head), (NORM_NAMES, norm)) if found is None]
        raise ValueError(f"{what}: no tensor named {' and '.join(missing)} in its safetensors files")
    if norm.replace(".weight", ".bias") in table:
        raise ValueError(f"{what}: the final norm has a bias (a LayerNorm); dense targets need an RMSNorm")
    record = TeacherHeadRecord(model_dir=str(model_dir), layer=num_layers, norm=_locate(model_dir, table, norm),
                               lm_head=_locate(model_dir, table, head), norm_eps=float(config["rms_norm_eps"]),
                               fingerprint="")
    if record.lm_head.shape != (vocab_size, hidden_size) or record.norm.shape != (hidden_size,):
        raise ValueError(f"{what}: {head} is {list(record.lm_head.shape)} and {norm} {list(record.norm.shape)}, "
                         f"expected [{vocab_size}, {hidden_size}] and [{hidden_size}]")
    return TeacherHeadRecord(**{**record.__dict__, "fingerprint": head_fingerprint(model_dir, record)})


def _tensor_span(model_dir: Path, loc: TensorLocation) -> tuple[Path, int, int, str, tuple[int, ...]]:
    """(file, first and last byte of the tensor, its dtype and shape), as the file's header says."""
    path = model_dir / loc.file
    if not path.is_file():
        raise ValueError(f"{path}: not found (the dense head's {loc.tensor})")
    header, data_start = safetensors_header(path)
    if loc.tensor not in header:
        raise ValueError(f"{path}: holds no tensor {loc.tensor!r}")
    entry = header[loc.tensor]
    begin, end = entry["data_offsets"]
    return path, data_start + int(begin), data_start + int(end), str(entry["dtype"]), tuple(map(int, entry["shape"]))


def head_fingerprint(model_dir: str | Path, record: TeacherHeadRecord) -> str:
    """sha256 over the norm's and lm_head's names, dtypes, shapes and stored bytes; dtype and shape
    as the file's header says, so the same bytes under another dtype (bf16 read as f16) differ."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    for loc in (record.norm, record.lm_head):
        path, begin, end, dtype, shape = _tensor_span(model_dir, loc)
        h.update(f"{loc.tensor}:{dtype}:{list(shape)}\n".encode())
        with open(path, "rb") as f:
            f.seek(begin)
            remaining = end - begin
            while remaining:
                block = f.read(min(remaining, 1 << 24))
                if not block:
                    raise ValueError(f"{path}: ends inside tensor {loc.tensor!r}")
                h.update(block)
                remaining -= len(block)
    return h.hexdigest()


def load_teacher_head(record: TeacherHeadRecord, model_dir: str | Path | None = None,
                      device: torch.device | str = "cpu") -> TeacherHead:
    """The head's tensors from `model_dir` (default: the recorded directory), after checking that
    their bytes hash to the recorded fingerprint; ValueError naming the file otherwise."""
    from safetensors import safe_open

    model_dir = Path(model_dir if model_dir is not None else record.model_dir).expanduser()
    if not model_dir.is_dir():
        raise ValueError(f"dense head: model directory {model_dir} does not exist (set loss.dense_head_path)")
    found = head_fingerprint(model_dir, record)
    if found != record.fingerprint:
        raise ValueError(f"{model_dir / record.lm_head.file}: the teacher's final norm and lm_head "
                         f"({record.norm.tensor}, {record.lm_head.tensor}) do not match the cache's fingerprint "
                         f"(sha256 {found[:12]}... vs {record.fingerprint[:12]}...): another teacher's weights")
    tensors = {}
    for key, loc in (("norm", record.norm), ("lm_head", record.lm_head)):
        with safe_open(str(model_dir / loc.file), framework="pt", device=str(device)) as f:
            tensors[key] = f.get_tensor(loc.tensor)
        assert tuple(tensors[key].shape) == loc.shape, (loc, tensors[key].shape)
    return TeacherHead(norm_weight_E=tensors["norm"], lm_head_VE=tensors["lm_head"], norm_eps=record.norm_eps)
