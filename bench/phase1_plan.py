"""The phase-1 plan: wall-clock and cost of caching the teacher's targets and of
training the student over the phase-1 tokens on one node of 8 GPUs (H100, H200,
B200), and the size of the cache.

    python bench/phase1_plan.py --rehearsal runs/rehearsal/rehearsal.json [--price-h200 3.2 ...]

Inputs are measurements (from a rehearsal.json written by bench/rehearsal.py, or
flags) and these stated assumptions:

- H200 figures are the measured ones: node rate = 8 x the one-GPU rate x the
  scaling efficiency measured from 1 to N GPUs (taken to hold at 8 when N < 8).
- H100 figures are the H200 figures scaled by what earlier runs of the same
  code measured on both cards: vLLM capture at the gpt-oss-20b shape 69,857
  tok/s on an H100 (docs/BENCHMARKS.md) against 71,200 on an H200 (0.981).
  Student training at 24 layers was measured on H200s only; the H100 ratio
  0.90 is an estimate from the H200 profile (docs/BENCHMARKS.md, "Student at
  production shape"): the matmuls and attention (487 of 779 ms per step) run
  at the same dense bf16 peak on both cards, the memory-bound kernels (194 ms)
  take 4.8 / 3.35 TB/s longer, and the host gaps (98 ms) stay.
- B200 figures are a projection, not a measurement: the H200 figures x the
  datasheet ratio of dense bf16 peaks, 2,250 / 989 TFLOP/s (2.28). Where a stage
  is bound by memory bandwidth the ratio is nearer 8.0 / 4.8 TB/s (1.67).
- Prices per GPU-hour are placeholders (US$ 2.50 H100, 3.50 H200, 5.50 B200,
  round on-demand cloud figures); pass your own with --price-*.
- One epoch of training over the phase-1 tokens. At a fixed micro batch the
  global batch changes only grad accumulation and the number of optimizer
  steps, so GBS 256 and 512 take the same training time here; the per-step
  overhead (clipping, optimizer step) measured at the rehearsal's small
  accumulation is spread over more tokens at 256 or 512, so these rates are a
  lower bound.
- Cache size: file bytes/token as inspect-shard measured them, at the cached
  hidden-state token fraction; other fractions scale the hidden part. A teacher
  with dummy weights does not compress like a real one (vLLM's dummy
  GPT-OSS-20B gave nearly the same top-64 at every position: 12 B/token of
  targets, and low-entropy hidden states), so pass a real teacher's figures
  with --file-bytes-per-token / --hidden-bytes-per-token (docs/BENCHMARKS.md:
  top-64 about 150 B/token, one fp8 2880-wide layer 2.4 KB/token). The
  validation split adds its own tokens.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

PHASE1_TOKENS = 665e6
NODE_GPUS = 8
GLOBAL_BATCHES = (256, 512)
H100_CAPTURE_RATIO = 69_857 / 71_200
H100_TRAIN_RATIO = 779 / (487 + 194 * 4.8 / 3.35 + 98)  # an estimate, see the module docstring
B200_FLOPS_RATIO = 2250 / 989
PLACEHOLDER_PRICES = {"H100": 2.50, "H200": 3.50, "B200": 5.50}


@dataclass(frozen=True)
class Measured:
    """One stage pair measured on the rehearsal's card."""

    card: str
    cache_tokens_per_s_one_gpu: float
    cache_scaling: float  # per-GPU rate on N GPUs / on one GPU
    train_tokens_per_s_one_gpu: float
    train_scaling: float
    scaling_gpus: int  # N
    scaling_measured: bool  # False: no one-GPU runs; the per-GPU rate on N GPUs stands for both
    file_bytes_per_token: float
    hidden_bytes_per_token: float
    hidden_token_fraction: float
    mean_row_tokens: float


@dataclass(frozen=True)
class Assumptions:
    tokens: float = PHASE1_TOKENS
    node_gpus: int = NODE_GPUS
    global_batches: tuple[int, ...] = GLOBAL_BATCHES
    h100_capture_ratio: float = H100_CAPTURE_RATIO
    h100_train_ratio: float = H100_TRAIN_RATIO
    b200_ratio: float = B200_FLOPS_RATIO
    prices: dict[str, float] = field(default_factory=lambda: dict(PLACEHOLDER_PRICES))


@dataclass(frozen=True)
class CardRates:
    card: str
    basis: str
    cache_node_tokens_per_s: float
    train_node_tokens_per_s: float


@dataclass(frozen=True)
class PlanRow:
    card: str
    basis: str
    global_batch: int
    optimizer_steps: int
    cache_hours: float
    cache_cost: float
    train_hours: float
    train_cost: float

    @property
    def total_hours(self) -> float:
        return self.cache_hours + self.train_hours

    @property
    def total_cost(self) -> float:
        return self.cache_cost + self.train_cost


def card_rates(m: Measured, a: Assumptions) -> list[CardRates]:
    """Node tokens/s of both stages on each card, with where the figure comes from."""
    gpus = a.node_gpus
    cache = gpus * m.cache_tokens_per_s_one_gpu * m.cache_scaling
    train = gpus * m.train_tokens_per_s_one_gpu * m.train_scaling
    if m.scaling_measured:
        scaled = f"scaling measured on {m.scaling_gpus} GPUs" + (f", taken to hold at {gpus}"
                                                                 if m.scaling_gpus != gpus else "")
    else:
        scaled = (f"per-GPU rates on {m.scaling_gpus} GPU(s) x scaling: cache {m.cache_scaling:.3g}, "
                  f"train {m.train_scaling:.3g}")
    return [
        CardRates("H200", f"measured on {m.card} ({scaled})", cache, train),
        CardRates("H100", f"H200 x {a.h100_capture_ratio:.3f} (cache, measured on both) / x {a.h100_train_ratio:.2f} "
                          "(train, estimated from the H200 profile)", cache * a.h100_capture_ratio,
                  train * a.h100_train_ratio),
        CardRates("B200", f"PROJECTION: H200 x {a.b200_ratio:.2f}" + (" (datasheet dense bf16 peaks)"
                                                                     if a.b200_ratio == B200_FLOPS_RATIO else ""),
                  cache * a.b200_ratio, train * a.b200_ratio),
    ]


def plan_rows(m: Measured, a: Assumptions) -> list[PlanRow]:
    rows = []
    for rates in card_rates(m, a):
        price = a.prices[rates.card]
        cache_hours = a.tokens / rates.cache_node_tokens_per_s / 3600
        train_hours = a.tokens / rates.train_node_tokens_per_s / 3600
        for gbs in a.global_batches:
            rows.append(PlanRow(rates.card, rates.basis, gbs, round(a.tokens / (gbs * m.mean_row_tokens)),
                                cache_hours, cache_hours * a.node_gpus * price, train_hours,
                                train_hours * a.node_gpus * price))
    return rows


def cache_terabytes(m: Measured, tokens: float, hidden_token_fraction: float) -> float:
    hidden = m.hidden_bytes_per_token * hidden_token_fraction / m.hidden_token_fraction
    return (m.file_bytes_per_token - m.hidden_bytes_per_token + hidden) * tokens / 1e12


def format_plan(m: Measured, a: Assumptions) -> str:
    lines = [f"Phase-1 plan: {a.tokens / 1e6:,.0f}M tokens, one node of {a.node_gpus} GPUs, one epoch",
             "",
             "| GPUs | basis | GBS | optimizer steps | cache h | cache $ | train h | train $ | total h | total $ |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in plan_rows(m, a):
        lines.append(f"| {a.node_gpus}x {r.card} | {r.basis} | {r.global_batch} | {r.optimizer_steps:,} | "
                     f"{r.cache_hours:,.1f} | {r.cache_cost:,.0f} | {r.train_hours:,.1f} | {r.train_cost:,.0f} | "
                     f"{r.total_hours:,.1f} | {r.total_cost:,.0f} |")
    lines += ["", "| cache | hidden token fraction | bytes/token | TB |", "|---|---|---|---|"]
    for fraction in sorted({m.hidden_token_fraction, 1.0}):
        basis = "measured" if fraction == m.hidden_token_fraction else "hidden part scaled"
        tb = cache_terabytes(m, a.tokens, fraction)
        lines.append(f"| {basis} | {fraction:g} | {tb * 1e12 / a.tokens:,.0f} | {tb:,.2f} |")
    prices = ", ".join(f"{card} {price:.2f}" for card, price in a.prices.items())
    lines += ["", f"Prices per GPU-hour (US$): {prices}"
              + (" (placeholders; pass --price-h100/--price-h200/--price-b200)"
                 if a.prices == PLACEHOLDER_PRICES else ""),
              (f"Optimizer steps at {m.mean_row_tokens:,.0f} tokens per sequence of the global batch on average "
               "(packed: real tokens per packed row). "
               "B200 rows are a projection, not a measurement.")]
    if "H200" not in m.card:
        lines.append(f"NOTE: measured on {m.card}, not an H200: the H200 rows (and the H100 and B200 rows "
                     "scaled from them) stand for that machine, not for the cards named.")
    return "\n".join(lines)


def measured_from_rehearsal(report: dict) -> Measured:
    """The plan's inputs from a rehearsal.json (bench/rehearsal.py)."""
    inputs = report["plan_inputs"]
    return Measured(**{name: inputs[name] for name in Measured.__dataclass_fields__})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rehearsal", type=Path, required=True, help="rehearsal.json written by bench/rehearsal.py")
    ap.add_argument("--tokens", type=float, default=PHASE1_TOKENS)
    ap.add_argument("--cache-tokens-per-s", type=float, help="one-GPU H200 cache rate instead of the measured one")
    ap.add_argument("--train-tokens-per-s", type=float, help="one-GPU H200 training rate instead of the measured one")
    ap.add_argument("--train-scaling", type=float, help="per-GPU training rate on N GPUs / on one, measured elsewhere")
    ap.add_argument("--cache-scaling", type=float,
                    help="per-GPU capture rate on N GPUs / on one, when the rehearsal's capture is too short to say")
    ap.add_argument("--b200-ratio", type=float, default=B200_FLOPS_RATIO,
                    help="B200 / H200 rate of both stages (default: the datasheet's dense bf16 peaks)")
    ap.add_argument("--file-bytes-per-token", type=float,
                    help="cache bytes/token of a real teacher (a dummy-weight teacher's compress unlike real ones)")
    ap.add_argument("--hidden-bytes-per-token", type=float, help="the hidden-state part of --file-bytes-per-token")
    for card, price in PLACEHOLDER_PRICES.items():
        ap.add_argument(f"--price-{card.lower()}", type=float, default=price,
                        help=f"US$ per {card} GPU-hour (default {price:.2f}, a placeholder)")
    args = ap.parse_args()
    measured = measured_from_rehearsal(json.loads(args.rehearsal.read_text()))
    if args.cache_tokens_per_s:
        measured = replace(measured, cache_tokens_per_s_one_gpu=args.cache_tokens_per_s,
                           card=f"{measured.card}, cache rate {args.cache_tokens_per_s:,.0f} tok/s from a flag")
    if args.train_tokens_per_s:
        measured = replace(measured, train_tokens_per_s_one_gpu=args.train_tokens_per_s,
                           card=f"{measured.card}, train rate {args.train_tokens_per_s:,.0f} tok/s from a flag")
    if args.train_scaling:  # measured elsewhere for training only: the cache's stays as it was
        measured = replace(measured, train_scaling=args.train_scaling, scaling_measured=False)
    if args.cache_scaling:
        measured = replace(measured, cache_scaling=args.cache_scaling, scaling_measured=False)
    if args.file_bytes_per_token:
        measured = replace(measured, file_bytes_per_token=args.file_bytes_per_token,
                           hidden_bytes_per_token=args.hidden_bytes_per_token or measured.hidden_bytes_per_token)
    prices = {card: getattr(args, f"price_{card.lower()}") for card in PLACEHOLDER_PRICES}
    print(format_plan(measured, Assumptions(tokens=args.tokens, prices=prices, b200_ratio=args.b200_ratio)))


if __name__ == "__main__":
    main()
