"""Throughput, MFU, memory, and the rank-0 log (console line + JSONL + optional TensorBoard).

MFU counts FLOPs per token as 6N for trained weights (forward, input grad,
weight grad), 4N for frozen ones (forward and input grad: a frozen expert
still passes gradients to the layers below), only the active share of MoE
experts, no embedding lookup, plus attention scores 12 x heads x head_dim x
context per layer (context capped by a sliding window).
"""

from __future__ import annotations

import json
import math
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

# Dense bf16 peak FLOP/s per device (datasheets).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "B200": 2250e12, "B100": 1750e12,
                   "GB200": 2500e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


@dataclass(frozen=True)
class FlopsModel:
    trained_active: int  # trained parameters a token passes through
    frozen_active: int
    attention_per_token: float  # score + value FLOPs per token, forward + backward

    @property
    def per_token(self) -> float:
        return 6.0 * self.trained_active + 4.0 * self.frozen_active + self.attention_per_token


def flops_model(model: nn.Module, config, seq_len: int) -> FlopsModel:
    """From the (unsharded) model's parameters and the HF config."""
    num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    experts_per_token = getattr(config, "num_experts_per_tok", None)
    trained = frozen = 0.0
    for name, p in model.named_parameters():
        if re.search(r"embed_tokens|wte|word_embeddings", name) and p is not _output_weight(model):
            continue  # a lookup, not a matmul
        n = float(p.numel())
        if num_experts and experts_per_token and re.search(r"\.experts\.", name):
            n *= experts_per_token / num_experts
        if p.requires_grad:
            trained += n
        else:
            frozen += n
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    attention = 0.0
    for kind in layer_types:
        context = min(window, seq_len) if (kind == "sliding_attention" and window) else seq_len
        attention += 12.0 * heads * head_dim * context
    return FlopsModel(int(trained), int(frozen), attention)


def _output_weight(model: nn.Module):
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return getattr(head, "weight", None)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return value
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated device memory (GPU), or this process's peak RSS (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss * 1024 / 2**30


class Throughput:
    """Tokens per second of step time (eval and checkpoint time excluded), between calls to `lap`."""

    def __init__(self):
        self.start = time.perf_counter()
        self.tokens = self.seconds = 0.0
        self.total_tokens = 0
        self.total_seconds = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.total_tokens += tokens
        self.total_seconds += seconds

    def lap(self) -> float:
        rate = self.tokens / max(self.seconds, 1e-9)
        self.tokens = self.seconds = 0.0
        return rate

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def mfu(tokens_per_s_per_device: float, flops: FlopsModel, device: torch.device) -> float | None:
    peak = peak_flops(device)
    return None if peak is None else tokens_per_s_per_device * flops.per_token / peak


# ---------------------------------------------------------------- logging


class MetricsLogger:
    """One console line and one JSONL record per call, on rank 0 only."""

    def __init__(self, jsonl_path: Path, is_main: bool, tensorboard_dir: str | None = None):
        self.path = Path(jsonl_path)
        self.is_main = is_main
        self.tb = None
        if is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard_dir:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self.tb = SummaryWriter(tensorboard_dir)
                except ImportError:
                    print("log.tensorboard: the tensorboard package is not installed; JSONL only", file=sys.stderr)

    def truncate_after(self, step: int) -> None:
        """On every start: drop records of steps the restored state has not taken (they
        are redone); starting at step 0, every record. A line a killed run left half
        written is dropped too. Replaced atomically."""
        if not self.is_main or not self.path.is_file():
            return
        from common.atomic import atomic_write_text

        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and step > 0 and _record_step(line) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        print(format_record(record), flush=True)
        if self.tb is not None:
            for tag, value in _scalars({k: v for k, v in record.items() if k != "step"}, record.get("kind", "train")):
                self.tb.add_scalar(tag, value, record.get("step", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _scalars(values: dict, prefix: str):
    """(tag, number) of every number in a record, nested ones (eval's by_source, by_channel)
    under their path: `eval/by_source/SYNTH/ce`."""
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}/{key}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}/{key}", value


def _record_step(line: str) -> float:
    """The step a JSONL line records (0 if none); inf for a line that is no record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return math.inf
    step = record.get("step", 0) if isinstance(record, dict) else None
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else math.inf


def format_record(record: dict) -> str:
    kind = record.get("kind", "train")
    parts = [f"{kind:5s} step {record.get('step', 0)}"]
    for key, fmt in (("loss", ".4f"), ("ce", ".4f"), ("kl", ".4f"), ("hidden_cos", ".4f"), ("top1", ".3f"),
                     ("grad_norm", ".3f"), ("lr", ".2e"), ("tokens_per_s", ",.0f"), ("mfu", ".1%"),
                     ("peak_mem_gib", ".2f"), ("cost_per_mtok", ".4f")):
        if record.get(key) is not None:
            parts.append(f"{key} {format(record[key], fmt)}")
    # eval by source and by channel (caches that store them)
    for group in ("by_source", "by_channel"):
        for name, g in (record.get(group) or {}).items():
            parts.append(f"{name} ce {g['ce']:.4f} kl {g['kl']:.4f} top1 {g['top1']:.3f}")
    return " | ".join(parts)
