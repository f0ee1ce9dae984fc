"""The `targets` and `hidden` sections of a cache config: what a cache stores per position,
turned into the cache's ShardSpec once the teacher's geometry is known."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from common.spec import HiddenSpec, ShardSpec, TargetSpec

DEFAULT_TOP_K = 64


@dataclass
class TargetsConfig:
    # Top-K logits per position and the full log-sum-exp at each temperature; None: 64.
    top_k: int | None = field(default=None, metadata={"flag": "--top-k"})
    temperatures: tuple[float, ...] = field(default=(1.0, 2.0), metadata={"flag": "--temperatures"})
    # N draws at T=1 per position instead of top-k (unbiased sampled targets).
    sampled: int | None = field(default=None, metadata={"flag": "--sampled"})

    def __post_init__(self):
        self.temperatures = tuple(float(t) for t in self.temperatures)
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {self.top_k}")
        if self.sampled is None:
            if not self.temperatures:
                raise ValueError("--temperatures needs at least one temperature for top-k targets")
            bad = [t for t in self.temperatures if not (math.isfinite(t) and t > 0)]
            if bad:
                raise ValueError(f"--temperatures must be finite and > 0, got {', '.join(map(str, bad))}")
            if len(set(self.temperatures)) != len(self.temperatures):
                raise ValueError(f"--temperatures lists a temperature twice: {self.temperatures}")

    def target_spec(self, seed: int) -> TargetSpec:
        if self.top_k is not None and self.sampled is not None:
            raise ValueError("choose either --top-k or --sampled, not both")
        if self.sampled is not None:
            return TargetSpec(mode="sampled", k=0, temperatures=(), num_samples=self.sampled, seed=seed)
        k = DEFAULT_TOP_K if self.top_k is None else self.top_k
        return TargetSpec(mode="topk", k=k, temperatures=self.temperatures, seed=seed)


@dataclass
class HiddenConfig:
    # 1-based teacher layers whose output stream is stored (the stream after decoder layer i).
    layers: tuple[int, ...] = field(default=(), metadata={"flag": "--hidden-layers"})
    dtype: str = field(default="bf16", metadata={"flag": "--hidden-dtype"})  # bf16 | fp8 (e4m3, per-token scale)
    # Fraction of positions whose hidden states are kept (a seeded subset per row).
    token_fraction: float = field(default=1.0, metadata={"flag": "--hidden-token-fraction"})
    # Also store the teacher's last layer and record where its final norm and lm_head live
    # (common/teacher_head.py): the trainer's `kl_mode: dense` rebuilds every logit from them.
    dense_from_last_layer: bool = field(default=False, metadata={"flag": "--dense-from-last-layer"})

    def __post_init__(self):
        self.layers = tuple(int(layer) for layer in self.layers)

    def stored_layers(self, num_layers: int) -> tuple[int, ...]:
        """The layers asked for, plus the last one when dense targets are asked for."""
        extra = (num_layers,) if self.dense_from_last_layer and num_layers not in self.layers else ()
        return self.layers + extra

    def hidden_spec(self, seed: int, num_layers: int, hidden_size: int) -> HiddenSpec:
        layers = self.stored_layers(num_layers)
        too_deep = [layer for layer in layers if layer > num_layers]
        if too_deep:
            raise ValueError(f"--hidden-layers {too_deep}: the teacher has {num_layers} layers (1-based)")
        if len(set(layers)) != len(layers):
            raise ValueError(f"--hidden-layers lists a layer twice: {self.layers}")
        return HiddenSpec(layers=tuple(sorted(layers)), dtype=self.dtype, token_fraction=self.token_fraction,
                          hidden_size=hidden_size if layers else 0, seed=seed)


def build_spec(targets: TargetsConfig, hidden: HiddenConfig, seed: int, vocab_size: int, num_layers: int,
               hidden_size: int) -> ShardSpec:
    return ShardSpec(vocab_size=vocab_size, targets=targets.target_spec(seed),
                     hidden=hidden.hidden_spec(seed, num_layers, hidden_size))
