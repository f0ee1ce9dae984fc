"""`vpmoe train` configuration: typed dataclasses loaded from YAML, with
`--set section.key=value` overrides (common.config_file).

The components own their settings: `data` is the loader's `LoaderSettings`
plus what only training reads, and `loss` is the loss's `LossConfig` under
the YAML's shorter keys; each key is declared and checked once, there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common import config_file
from common.causal_lm import TORCH_DTYPES
from common.paths import is_within, overlap, overlap_error
from student_train.loader import LoaderSettings
from student_train.losses import LossConfig

DTYPES = tuple(TORCH_DTYPES)
OPTIMIZERS = ("adamw", "muon")
DEVICES = ("auto", "cpu", "cuda")
FROZEN_PLACEMENTS = ("replicate", "shard")

# Phase 1 of the user's plan: attention (incl. GPT-OSS sinks) and the MoE router
# learn; experts, embeddings, lm_head and norms stay as loaded. `freeze` wins
# over `train`, so a norm inside attention (q_norm) stays frozen.
PHASE1_TRAIN = [r"\.self_attn\.", r"\.mlp\.router\."]
PHASE1_FREEZE = [r"\.experts\.", r"embed_tokens", r"lm_head", r"norm"]


@dataclass
class StudentConfig:
    path: str | None = None  # HF model directory (or a repo id already in the local HF cache)
    init_config: str | None = None  # a config.json (or its directory) to initialise randomly from
    trust_remote_code: bool = False
    dtype: str = "fp32"  # dtype trained weights (and so the optimizer state) are kept in
    # Frozen weights never update, so an fp32 copy buys nothing: e.g. bf16 halves the experts' memory.
    # Needs a GPU (FSDP2 or autocast computes in bf16 anyway); None: the same as dtype.
    frozen_dtype: str | None = None
    compute_dtype: str = "bf16"  # FSDP2 parameter dtype on GPU; CPU always computes in `dtype`
    attn_implementation: str | None = None  # e.g. sdpa, eager, flash_attention_2; None: the model's default
    experts_implementation: str | None = None  # MoE experts kernel (e.g. eager, grouped_mm); None: the default
    train: list[str] = field(default_factory=lambda: list(PHASE1_TRAIN))  # regexes; empty = every parameter
    freeze: list[str] = field(default_factory=lambda: list(PHASE1_FREEZE))  # regexes, applied after `train`


@dataclass
class DataConfig(LoaderSettings):
    """The loader's settings (student_train/loader.py) and the caches and batch sizes of a run."""

    train_cache: str = ""
    eval_cache: str | None = None
    # An eval cache made by another teacher than the train cache is refused; true: a warning instead.
    allow_teacher_mismatch: bool = False
    # sequences (batch rows; packed: rows of seq_len tokens) per optimizer step over all ranks; 0: micro x world x grad_accum
    global_batch: int = 0
    grad_accum: int = 0  # 0: global_batch / (micro_batch x world size)
    pin_memory: bool = True  # pinned host batches where there is a GPU
    max_samples: int = 0  # 0: every row

    def __post_init__(self):
        super().__post_init__()
        if self.global_batch < 0 or self.grad_accum < 0:
            raise ValueError("global_batch: global_batch and grad_accum must be >= 0")
        if self.max_samples < 0:
            raise ValueError(f"max_samples: must be >= 0 (0: every row), got {self.max_samples}")


# The YAML's `loss` section: LossConfig's fields under shorter keys, lists for YAML;
# `to_loss_config()` builds (and so checks) the LossConfig.
LossSection = config_file.view_of(LossConfig, "LossSection",
                                  {"ce_weight": "ce", "kl_weight": "kl", "hidden_cosine_weight": "hidden_cosine"},
                                  "to_loss_config")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | muon (Muon on 2-D hidden weights, AdamW on the rest)
    steps: int = 0  # optimizer steps; 0: one epoch of the train cache
    lr: float = 3e-4
    min_lr: float = 1e-5
    warmup_ratio: float = 0.025
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    fused: bool = True  # fused AdamW where the device supports it
    grad_clip: float = 0.5  # 0: off
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5


@dataclass
class CheckpointConfig:
    dir: str = "runs/train/checkpoints"
    every: int = 200  # 0: only at the end
    keep: int = 3


@dataclass
class ExportConfig:
    dir: str | None = None  # HF export at the end; None: <checkpoint.dir>/../export
    enabled: bool = True
    dtype: str | None = None  # fp32 | bf16 | fp16; None: student.dtype


@dataclass
class EvalConfig:
    every: int = 100  # 0: never
    samples: int = 64  # eval rows over all ranks; 0: the whole eval cache
    micro_batch: int = 0  # 0: data.micro_batch
    early_stop_patience: int = 0  # stop when the eval loss rose this many evals in a row; 0: off


@dataclass
class LogConfig:
    every: int = 1
    jsonl: str | None = None  # None: <checkpoint.dir>/../log.jsonl
    tensorboard: str | None = None  # a directory; needs the tensorboard package


@dataclass
class TrainConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile each decoder block
    activation_checkpointing: bool = False
    # replicate: frozen weights whole on every rank, FSDP2 shards what trains (no all-gather of
    # frozen weights per micro batch); shard: FSDP2 shards frozen weights too (less memory).
    frozen_weights: str = "replicate"
    gpu_hour_price: float = 0.0  # per GPU-hour; > 0 adds cost per million tokens to the summary

    @property
    def run_dir(self) -> Path:
        return Path(self.checkpoint.dir).parent

    @property
    def jsonl_path(self) -> Path:
        return Path(self.log.jsonl) if self.log.jsonl else self.run_dir / "log.jsonl"

    @property
    def export_dir(self) -> Path:
        return Path(self.export.dir) if self.export.dir else self.run_dir / "export"


# ---------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """YAML file (or None for the defaults) + `key=value` overrides -> validated TrainConfig."""
    config = config_file.load(TrainConfig, path, overrides)
    validate(config, str(path) if path is not None else "config")
    return config


def apply_override(raw: dict, item: str) -> None:
    """`a.b.c=value` into the raw dict (see common.config_file.apply_override)."""
    config_file.apply_override(TrainConfig, raw, item)


def validate(config: TrainConfig, where: str = "config") -> None:
    """Checks that span keys; each message names the key."""
    s, d, o = config.student, config.data, config.optim

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ValueError(f"{where}: {key}: {msg}")

    need((s.path is None) != (s.init_config is None), "student.path",
         "set exactly one of student.path and student.init_config")
    need(s.dtype in DTYPES, "student.dtype", f"must be one of {DTYPES}")
    need(s.compute_dtype in DTYPES, "student.compute_dtype", f"must be one of {DTYPES}")
    need(s.frozen_dtype is None or s.frozen_dtype in DTYPES, "student.frozen_dtype", f"must be one of {DTYPES}")
    need(s.frozen_dtype in (None, s.dtype) or config.device != "cpu", "student.frozen_dtype",
         "a dtype other than student.dtype needs device cuda (CPU matmuls need one dtype)")
    need(config.export.dtype is None or config.export.dtype in DTYPES, "export.dtype", f"must be one of {DTYPES}")
    need(bool(d.train_cache), "data.train_cache", "is required")
    try:
        config.loss.to_loss_config()
    except ValueError as exc:
        raise ValueError(f"{where}: {config_file.section_error('loss', exc, LossSection)}") from None
    need(o.name in OPTIMIZERS, "optim.name", f"must be one of {OPTIMIZERS}")
    need(o.steps >= 0, "optim.steps", "must be >= 0")
    need(o.lr > 0 and 0 <= o.min_lr <= o.lr, "optim.min_lr", "need lr > 0 and 0 <= min_lr <= lr")
    need(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "must be two numbers in [0, 1)")
    need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 turns clipping off)")
    need(o.muon_ns_steps >= 1, "optim.muon_ns_steps", "must be >= 1")
    need(config.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")
    need(config.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    need(config.eval.every >= 0 and config.eval.samples >= 0, "eval.every", "every and samples must be >= 0")
    need(config.eval.every == 0 or bool(d.eval_cache), "data.eval_cache", "eval.every > 0 needs an eval cache")
    need(config.eval.early_stop_patience >= 0, "eval.early_stop_patience", "must be >= 0")
    need(config.log.every >= 1, "log.every", "must be >= 1")
    need(config.device in DEVICES, "device", f"must be one of {DEVICES}")
    need(config.frozen_weights in FROZEN_PLACEMENTS, "frozen_weights", f"must be one of {FROZEN_PLACEMENTS}")
    need(config.gpu_hour_price >= 0, "gpu_hour_price", "must be >= 0")
    check_run_paths(config, where)


def run_outputs(config: TrainConfig) -> dict[str, Path]:
    """What a run writes, by config key."""
    outputs = {"checkpoint.dir": Path(config.checkpoint.dir), "log.jsonl": config.jsonl_path}
    if config.export.enabled:
        outputs["export.dir"] = config.export_dir
    if config.log.tensorboard:
        outputs["log.tensorboard"] = Path(config.log.tensorboard)
    return outputs


def run_inputs(config: TrainConfig) -> dict[str, Path]:
    """What a run reads, by config key (a student given as a hub id resolves to no real path)."""
    named = {"data.train_cache": config.data.train_cache,
             "data.eval_cache": config.data.eval_cache if config.eval.every > 0 else None,
             "student.path": config.student.path, "student.init_config": config.student.init_config,
             "loss.dense_head_path": config.loss.dense_head_path}
    return {key: Path(value) for key, value in named.items() if value}


def check_run_paths(config: TrainConfig, where: str = "config") -> None:
    """No output overlaps another, and no input lies inside an output.

    The export replaces its directory at the end of the run and checkpoint
    rotation deletes directories inside checkpoint.dir: an export.dir holding
    checkpoint.dir (e.g. the run directory itself) would delete every checkpoint.
    """
    outputs = list(run_outputs(config).items())
    for i, (key, path) in enumerate(outputs):
        for other_key, other in outputs[i + 1:]:
            if overlap(path, other):
                raise overlap_error(f"{where}: {key}", path, other_key, other,
                                    "run outputs must be separate paths, none inside another (the export replaces "
                                    "its directory, old checkpoints are deleted)")
    for key, path in run_inputs(config).items():
        for out_key, out in outputs:
            if is_within(path, out):
                raise overlap_error(f"{where}: {key}", path, out_key, out,
                                    "an input must not lie inside what the run writes or replaces")


def grad_accum_steps(data: DataConfig, world_size: int) -> int:
    """Micro batches per rank per optimizer step."""
    per_pass = data.micro_batch * world_size
    if data.global_batch == 0:
        return max(data.grad_accum, 1)
    if data.global_batch % per_pass:
        raise ValueError(f"data.global_batch={data.global_batch} is not a multiple of micro_batch x world size "
                         f"= {data.micro_batch} x {world_size}")
    accum = data.global_batch // per_pass
    if data.grad_accum and data.grad_accum != accum:
        raise ValueError(f"data.grad_accum={data.grad_accum} disagrees with data.global_batch={data.global_batch} "
                         f"at micro_batch {data.micro_batch} x world size {world_size} (= {accum})")
    return accum


# ---------------------------------------------------------------- saving


def to_dict(config: TrainConfig) -> dict:
    return config_file.to_raw(config)


def save_config(config: TrainConfig, path: str | Path) -> Path:
    """Writes a YAML file that `load_config` reads back to an equal config."""
    from common.atomic import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
    return path
