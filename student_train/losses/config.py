"""The loss's settings, and the objective they weight: the one place that combines CE, KL and
the T**2 scale, for the training loss and for the eval summary alike."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from student_train.losses.channel_weights import ChannelWeights, check_weight
from student_train.losses.dense_targets import DENSE_FALLBACKS
from student_train.losses.divergences import divergence_names


def objective_weights(ce_weight: float, kl_weight: float, kl_temperature: float,
                      scale_by_t2: bool) -> tuple[float, float]:
    """(CE coefficient, KL coefficient) of objective = ce_weight*CE + kl_weight*s*KL_T, with
    s = T**2 when scale_by_t2 (Hinton: keeps the KL gradient's size independent of T), else 1."""
    return ce_weight, kl_weight * (kl_temperature**2 if scale_by_t2 else 1.0)


@dataclass(frozen=True)
class LossConfig:
    ce_weight: float = 1.0
    kl_weight: float = 1.0
    hidden_cosine_weight: float = 0.0
    kl_temperature: float = 1.0
    kl_mode: str = "tail"  # a name in student_train.losses.divergences.DIVERGENCES
    scale_by_t2: bool = True  # multiply the KL by T**2 (objective_weights)
    chunk_size: int = 1024
    compile_chunks: bool = False  # torch.compile the per-chunk loss and gradient (one fused pass on GPUs)
    # (student_layer, teacher_layer), both 1-based: the stream leaving that decoder layer
    layer_pairs: tuple[tuple[int, int], ...] = ()
    # kl_mode dense: positions without a cached last-layer state use the cache's targets
    # ("targets": tail for top-k, sampled for sampled) or get no KL ("skip").
    dense_fallback: str = "targets"
    # kl_mode dense: the teacher's model directory (its final norm and lm_head); None: the one the
    # cache's manifest records. The tensors must hash to the manifest's fingerprint either way.
    dense_head_path: str | None = None
    # CE and KL weighted per token by its channel (caches with channels); all 1: unweighted
    channel_weights: ChannelWeights = field(default_factory=ChannelWeights)

    def __post_init__(self):
        for key in ("ce_weight", "kl_weight", "hidden_cosine_weight"):
            check_weight(key, getattr(self, key))
        if self.ce_weight == 0 and self.kl_weight == 0 and self.hidden_cosine_weight == 0:
            raise ValueError("ce_weight, kl_weight and hidden_cosine_weight are all 0: nothing to train on")
        t = self.kl_temperature
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise ValueError(f"kl_temperature must be a finite number > 0, got {t!r}")
        if self.kl_mode not in divergence_names():
            raise ValueError(f"kl_mode: must be one of {divergence_names()}, got {self.kl_mode!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {self.chunk_size!r}")
        if self.dense_fallback not in DENSE_FALLBACKS:
            raise ValueError(f"dense_fallback must be one of {DENSE_FALLBACKS}, got {self.dense_fallback!r}")
        # YAML gives lists; store tuples so the config stays hashable and frozen.
        try:
            pairs = tuple((int(s), int(t)) for s, t in self.layer_pairs)
        except (TypeError, ValueError):
            raise ValueError(f"layer_pairs must be (student_layer, teacher_layer) pairs, got {self.layer_pairs!r}")
        if any(s < 1 or t < 1 for s, t in pairs):
            raise ValueError(f"layer_pairs are 1-based layer numbers, got {pairs}")
        if len(set(pairs)) != len(pairs):
            raise ValueError(f"layer_pairs has duplicates: {pairs}")
        if self.hidden_cosine_weight > 0 and not pairs:
            raise ValueError("hidden_cosine_weight > 0 needs layer_pairs")
        object.__setattr__(self, "layer_pairs", pairs)

    @property
    def hidden_pairs(self) -> tuple[tuple[int, int], ...]:
        """The layer pairs the hidden cosine loss compares (none while its weight is 0)."""
        return self.layer_pairs if self.hidden_cosine_weight > 0 else ()

    @property
    def teacher_layers(self) -> tuple[int, ...]:
        """Teacher layers whose cached hidden states the loss reads, ascending."""
        return tuple(sorted({t for _, t in self.hidden_pairs}))

    def objective(self, ce: float, kl: float) -> float:
        """The weighted CE + KL that training minimises, from per-token CE and plain KL at T."""
        ce_coef, kl_coef = objective_weights(self.ce_weight, self.kl_weight, self.kl_temperature, self.scale_by_t2)
        return ce_coef * ce + kl_coef * kl

    def distill_kwargs(self) -> dict:
        """The keyword arguments of `distill_loss` that this config sets."""
        return dict(ce_weight=self.ce_weight, kl_weight=self.kl_weight, kl_mode=self.kl_mode,
                    kl_temperature=self.kl_temperature, scale_by_t2=self.scale_by_t2,
                    chunk_size=self.chunk_size, compile_chunks=self.compile_chunks)
