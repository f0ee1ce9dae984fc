"""A synthetic teacher: realistic peaked next-token distributions, with exact
float64 references, for tests and benchmarks that need a teacher's targets at
the production vocabulary without a model.

A trained LM's next-token distribution is peaked: one token usually takes
20-90% of the mass, a handful of plausible alternatives share most of the
rest, and a long tail follows a Zipf-like frequency prior. The generator
builds logits that way, per position:

* tail: `-zipf_exponent * log(rank + 1)` plus Gaussian noise (sd `noise`);
* 1-8 plausible alternatives drawn from the same prior, taking a fraction
  f ~ U(0.3, 0.9) of the mass not held by the top token;
* the top token, drawn from the prior, set so its probability is p ~ U(0.2, 0.9).

`clustered_ids=True` ranks ids by id (frequent tokens have small ids, as in BPE
vocabularies whose early merges are the frequent ones), which makes sorted id
deltas small; `False` scatters the ranks over the vocabulary with a random
permutation, the worst case for id coding.

Shape suffixes: P positions, V vocabulary, K top-k width, T temperatures,
M draws per position, D hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PeakedConfig:
    zipf_exponent: float = 1.1
    noise: float = 1.0
    top_prob: tuple[float, float] = (0.2, 0.9)
    alternatives: tuple[int, int] = (1, 8)
    alternative_share: tuple[float, float] = (0.3, 0.9)
    clustered_ids: bool = True


def _rank_of_id(vocab_size: int, clustered: bool, seed: int) -> np.ndarray:
    if clustered:
        return np.arange(vocab_size)
    return np.random.default_rng([seed, 7]).permutation(vocab_size)


def peaked_logits(num_positions: int, vocab_size: int, seed: int,
                  config: PeakedConfig = PeakedConfig()) -> np.ndarray:
    """[P, V] float32 teacher logits at T=1 (see the module docstring)."""
    rng = np.random.default_rng([seed, 1])
    rank_V = _rank_of_id(vocab_size, config.clustered_ids, seed)
    prior_V = -config.zipf_exponent * np.log1p(rank_V)
    prior_cdf_V = np.cumsum(np.exp(prior_V - prior_V.max()))

    # float32 for the [P, V] work (the result is float32 anyway); the exact
    # references are computed later from the returned logits in float64.
    logits_PV = rng.standard_normal((num_positions, vocab_size), dtype=np.float32)
    logits_PV *= np.float32(config.noise)
    logits_PV += prior_V.astype(np.float32)[None, :]
    lse_all_P = _lse_rows(logits_PV)
    for p in range(num_positions):
        row_V = logits_PV[p]
        num_alt = int(rng.integers(config.alternatives[0], config.alternatives[1] + 1))
        draws = np.searchsorted(prior_cdf_V, rng.random(num_alt + 1) * prior_cdf_V[-1], side="right")
        chosen = np.unique(np.minimum(draws, vocab_size - 1))
        rng.shuffle(chosen)
        top, alts = chosen[0], chosen[1:]
        # Mass of the tail without the chosen ids (they are about to be replaced).
        rest_lse = lse_all_P[p] + np.log1p(-np.exp(row_V[chosen] - lse_all_P[p]).sum())
        # Alternatives take share f of the non-top mass: their logsumexp sits at
        # rest_lse + log(f / (1 - f)); Dirichlet weights split it among them.
        share = rng.uniform(*config.alternative_share)
        non_top_lse = rest_lse
        if len(alts):
            alt_lse = rest_lse + np.log(share / (1 - share))
            weights = rng.dirichlet(np.full(len(alts), 0.7))
            row_V[alts] = alt_lse + np.log(np.maximum(weights, 1e-12))
            non_top_lse = np.logaddexp(rest_lse, alt_lse)
        top_prob = rng.uniform(*config.top_prob)
        row_V[top] = non_top_lse + np.log(top_prob / (1 - top_prob))
    # Shift so the maximum logit is about 20-30, as real lm_heads produce.
    logits_PV += (rng.uniform(20.0, 30.0, size=(num_positions, 1))
                  - logits_PV.max(axis=1, keepdims=True)).astype(np.float32)
    return logits_PV


def _lse_rows(x_PV: np.ndarray) -> np.ndarray:
    m_P = x_PV.max(axis=1)
    return m_P.astype(np.float64) + np.log(np.exp(x_PV - m_P[:, None]).sum(axis=1, dtype=np.float64))


CHUNK_POSITIONS = 64  # float64 [chunk, V] work arrays stay near 100 MB at V = 201,088


def lse_float64(logits_PV: np.ndarray, temperatures: tuple[float, ...]) -> np.ndarray:
    """[P, T] exact log-sum-exp of logits / T over the full vocabulary."""
    out_PT = np.empty((len(logits_PV), len(temperatures)))
    for start in range(0, len(logits_PV), CHUNK_POSITIONS):
        x_pV = logits_PV[start:start + CHUNK_POSITIONS].astype(np.float64)
        for ti, t in enumerate(temperatures):
            scaled = x_pV / t
            m = scaled.max(axis=1, keepdims=True)
            out_PT[start:start + len(x_pV), ti] = (m + np.log(np.exp(scaled - m).sum(axis=1, keepdims=True)))[:, 0]
    return out_PT


def sample_counts(logits_PV: np.ndarray, uniforms_PM: np.ndarray):
    """Inverse-CDF draws at T=1 in float64 -> (distinct ids ascending, counts, sizes_P)."""
    ids, counts, sizes = [], [], []
    vocab_size = logits_PV.shape[1]
    for start in range(0, len(logits_PV), CHUNK_POSITIONS):
        x_pV = logits_PV[start:start + CHUNK_POSITIONS].astype(np.float64)
        cdf_pV = np.cumsum(np.exp(x_pV - x_pV.max(axis=1, keepdims=True)), axis=1)
        for p in range(len(x_pV)):
            draws = np.searchsorted(cdf_pV[p], uniforms_PM[start + p] * cdf_pV[p, -1], side="right")
            u, c = np.unique(np.minimum(draws, vocab_size - 1), return_counts=True)
            ids.append(u)
            counts.append(c)
            sizes.append(len(u))
    if not sizes:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    return np.concatenate(ids).astype(np.int64), np.concatenate(counts).astype(np.int64), np.array(sizes, np.int64)


def hidden_like(num_tokens: int, dim: int, seed: int) -> torch.Tensor:
    """Residual-stream-like states: Gaussian with a few large outlier channels."""
    rng = np.random.default_rng([seed, 3])
    channel_scale_D = np.ones(dim)
    channel_scale_D[rng.choice(dim, size=max(1, dim // 64), replace=False)] = 20.0
    return torch.from_numpy((rng.standard_normal((num_tokens, dim)) * channel_scale_D).astype(np.float32))


def topk_tail_kl(logits_true_PK: np.ndarray, lse_true_P: np.ndarray, logits_dec_PK: np.ndarray,
                 lse_dec_P: np.ndarray, temperature: float) -> np.ndarray:
    """KL(exact || decoded) over k kept ids + one tail bucket, per position, float64.

    Both sides are ordered the same way (the caller aligns the ids).
    """
    logq_PK = logits_true_PK.astype(np.float64) / temperature - lse_true_P[:, None]
    logp_PK = logits_dec_PK.astype(np.float64) / temperature - lse_dec_P.astype(np.float64)[:, None]
    q_PK, p_PK = np.exp(logq_PK), np.exp(logp_PK)
    q_tail = np.clip(1.0 - q_PK.sum(axis=1), 1e-30, None)
    p_tail = np.clip(1.0 - p_PK.sum(axis=1), 1e-30, None)
    return (q_PK * (logq_PK - logp_PK)).sum(axis=1) + q_tail * np.log(q_tail / p_tail)
