"""Teacher target selection on the device, shared by every backend.

Given the teacher's final normed hidden states for N positions and a function
that maps a chunk of them to full-vocabulary logits, compute what a shard
stores: top-k ids and logits plus the full log-sum-exp at each temperature, or
N sampled draws reduced to distinct ids and counts. Logits exist for one chunk
of positions at a time ([chunk, V] in the lm_head's dtype), never for all N;
log-sum-exps and probabilities are summed in float32.

Shape suffixes: N positions, D hidden size, V vocabulary, K top-k width,
T temperatures, M draws per position, S flattened distinct samples.
"""

from __future__ import annotations

from dataclasses import dataclass
import functools
import warnings
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch

from common.spec import TargetSpec
from common.targets import RowTargets
from common.targets.sampled import SampledRowTargets
from common.targets.topk import TopkRowTargets
from teacher_cache import fused_selection

DEFAULT_CHUNK = 1024
DEFAULT_TOPK_BLOCK = 128


@dataclass(frozen=True)
class SelectionConfig:
    """How the device selects top-k targets (what is stored is the TargetSpec's). Switches for
    debugging and comparison; the CPU path is always plain `torch.topk` and the eager log-sum-exp."""

    # CUDA: the log-sum-exps as one compiled kernel; false: the eager reference
    # (a failed compile falls back to it with a warning).
    compile: bool = True
    # CUDA: the one-read Triton kernel (log-sum-exps and block maxima); false: separate passes.
    fused: bool = True
    # Entries per vocabulary block of the exact block-max top-k on CUDA; 0: one plain torch.topk.
    topk_block: int = DEFAULT_TOPK_BLOCK

    def __post_init__(self):
        if not isinstance(self.topk_block, int) or self.topk_block < 0:
            raise ValueError(f"topk_block: must be an int >= 0 (0: plain torch.topk), got {self.topk_block!r}")


@dataclass
class PositionTargets:
    """Targets for N positions (torch tensors, on the compute device)."""

    topk_ids_NK: torch.Tensor | None = None
    topk_logits_NK: torch.Tensor | None = None
    lse_NT: torch.Tensor | None = None
    sample_ids_S: torch.Tensor | None = None
    sample_counts_S: torch.Tensor | None = None
    sample_sizes_N: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> "PositionTargets":
        moved = {k: (v.to(device, non_blocking=non_blocking) if v is not None else None)
                 for k, v in self.__dict__.items()}
        return PositionTargets(**moved)


def row_uniforms(seed: int, row_id: int, num_positions: int, num_samples: int) -> np.ndarray:
    """Uniform draws for one row's sampled targets, [P, M] float64 in [0, 1).

    Seeded by (seed, row_id) alone so the draws never depend on batching,
    worker count or resume.
    """
    rng = np.random.Generator(np.random.PCG64([seed, row_id, 0x53414D50]))
    return rng.random((num_positions, num_samples))


def _lse_eager(logits_nV: torch.Tensor, inv_temps: tuple[float, ...]) -> torch.Tensor:
    """Log-sum-exp of `logits / T` for each temperature, [n, T] float32, with
    float32 sums whatever the logits' dtype."""
    max_n1 = logits_nV.amax(dim=-1, keepdim=True).float()
    cols = []
    for inv_t in inv_temps:
        sum_n = torch.exp((logits_nV.float() - max_n1) * inv_t).sum(dim=-1)
        cols.append(torch.log(sum_n) + max_n1[:, 0] * inv_t)
    return torch.stack(cols, dim=-1)


_compiled_state: bool | None = None  # None until the compiled kernel has run once


@functools.cache
def compiled_lse() -> Callable:
    return torch.compile(_lse_eager, dynamic=True)


def _lse(logits_nV: torch.Tensor, inv_temps: tuple[float, ...], compile: bool = True) -> torch.Tensor:
    """On CUDA the log-sum-exps are one compiled kernel that reads the [n, V]
    logits in their own dtype once for all temperatures; eagerly each
    temperature would write and re-read a float32 copy of them. The eager path
    is the reference (and the CPU path, where compiling costs more than it
    saves); `compile=False` (SelectionConfig.compile) forces it."""
    global _compiled_state
    if logits_nV.device.type != "cuda" or not compile or _compiled_state is False:
        return _lse_eager(logits_nV, inv_temps)
    if _compiled_state:
        return compiled_lse()(logits_nV, inv_temps)
    try:  # the first call compiles; a host without a working compiler toolchain falls back
        lse_nT = compiled_lse()(logits_nV, inv_temps)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any compile failure means: run eagerly
        warnings.warn(f"compiled log-sum-exp unavailable ({type(exc).__name__}: {exc}); using the eager path")
        _compiled_state = False
        return _lse_eager(logits_nV, inv_temps)
    _compiled_state = True
    return lse_nT


def block_max_topk(logits_nV: torch.Tensor, k: int, block: int,
                   block_max_nB: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over the last dim that reads the logits once.

    Why: `torch.topk` over 201,088 bf16 entries is a multi-pass radix select
    that costs as much as the lm_head matmul itself. Instead: the max of every
    `block` consecutive entries (one memory-bound pass, or `block_max_nB` when
    the caller has them already), the k blocks with the largest maxima, and a
    top-k over just their k * block entries (plus a short last block, always
    kept). Exact: an entry of the global top-k whose block is not among the k
    best has k blocks with a max at least its value, so k other entries tie or
    beat it and the top-k values are unchanged; ids may differ from
    `torch.topk`'s only between tied values. Unsorted output (the codec sorts ids)."""
    n, V = logits_nV.shape
    full = V // block if block > 0 else 0
    if full <= k:
        return logits_nV.topk(min(k, V), dim=-1, sorted=False)
    main = full * block
    if block_max_nB is None:
        block_max_nB = logits_nV[:, :main].reshape(n, full, block).amax(dim=-1)
    assert block_max_nB.shape == (n, full)
    top_blocks_nK = block_max_nB.topk(k, dim=-1, sorted=False).indices
    offsets_b = torch.arange(block, device=logits_nV.device)
    cand_ids_nC = (top_blocks_nK[:, :, None] * block + offsets_b).reshape(n, k * block)
    if main < V:  # the last, shorter block is always a candidate
        tail_ids = torch.arange(main, V, device=logits_nV.device).expand(n, V - main)
        cand_ids_nC = torch.cat([cand_ids_nC, tail_ids], dim=1)
    cand_vals_nC = logits_nV.gather(1, cand_ids_nC)
    top_vals_nK, pos_nK = cand_vals_nC.topk(k, dim=-1, sorted=False)
    return top_vals_nK, cand_ids_nC.gather(1, pos_nK)


CHECK_ROWS = 32
_fused_state: bool | None = None  # None until the fused kernel's first result was checked


def _fused_lse_block_max(logits_nV: torch.Tensor, inv_temps: tuple[float, ...], block: int):
    """(lse_nT, block_max_nB) from the one-read Triton kernel, or None where it
    does not apply. Its first result is checked against the eager reference; a
    failure or a mismatch turns it off for the process with a warning."""
    global _fused_state
    if (_fused_state is False or not fused_selection.available()
            or block <= 0 or fused_selection.CHUNK % block or logits_nV.stride(-1) != 1):
        return None
    try:
        lse_nT, bmax_nB = fused_selection.lse_and_block_max(logits_nV, inv_temps, block)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot build means: the unfused path
        warnings.warn(f"fused selection kernel unavailable ({type(exc).__name__}: {exc}); using separate passes")
        _fused_state = False
        return None
    if _fused_state is None:  # checked on a few rows: the float32 reference of a whole chunk is ~1 GB
        rows = logits_nV[:CHECK_ROWS]
        full = logits_nV.shape[1] // block
        ref_bmax = (rows[:, :full * block].reshape(len(rows), full, block).amax(dim=-1).float()
                    if full else bmax_nB[:CHECK_ROWS])
        ref_lse = _lse_eager(rows, inv_temps)
        if not (torch.equal(bmax_nB[:CHECK_ROWS], ref_bmax)
                and torch.allclose(lse_nT[:CHECK_ROWS], ref_lse, rtol=1e-5, atol=1e-5)):
            warnings.warn("fused selection kernel disagrees with the reference; using separate passes")
            _fused_state = False
            return None
        _fused_state = True
    return lse_nT, bmax_nB


def _topk_chunk(logits_nV: torch.Tensor, spec: TargetSpec, config: SelectionConfig):
    # Top-k in the logits' own dtype (bf16 from a bf16 lm_head): the values are
    # the same as in a float32 copy, and the selection reads half the bytes.
    inv_temps = tuple(1.0 / t for t in spec.temperatures)
    if logits_nV.device.type != "cuda":
        topk_logits_nK, topk_ids_nK = logits_nV.topk(spec.k, dim=-1)
        return topk_ids_nK, topk_logits_nK.float(), _lse_eager(logits_nV, inv_temps)
    block = config.topk_block
    fused = _fused_lse_block_max(logits_nV, inv_temps, block) if config.fused else None
    lse_nT, block_max_nB = fused if fused is not None else (_lse(logits_nV, inv_temps, config.compile), None)
    topk_logits_nK, topk_ids_nK = block_max_topk(logits_nV, spec.k, block, block_max_nB)
    return topk_ids_nK, topk_logits_nK.float(), lse_nT


def _sample_chunk(logits_nV: torch.Tensor, uniforms_nM: torch.Tensor):
    """Inverse-CDF draws at T=1, reduced to sorted distinct ids and counts."""
    probs_nV = torch.softmax(logits_nV, dim=-1)
    cdf_nV = torch.cumsum(probs_nV, dim=-1)
    # Scale the draws by the cdf's own total so float32 rounding in the cumsum
    # cannot push a draw past the last bucket.
    targets_nM = uniforms_nM.to(cdf_nV.dtype) * cdf_nV[:, -1:]
    draws_nM = torch.searchsorted(cdf_nV, targets_nM, right=True).clamp_max(logits_nV.shape[-1] - 1)
    draws_nM, _ = draws_nM.sort(dim=-1)
    is_new_nM = torch.ones_like(draws_nM, dtype=torch.bool)
    is_new_nM[:, 1:] = draws_nM[:, 1:] != draws_nM[:, :-1]
    sizes_n = is_new_nM.sum(dim=-1)
    ids_S = draws_nM[is_new_nM]
    # Count of each distinct id = distance between consecutive run starts.
    num_draws = draws_nM.shape[1]
    flat_start_S = torch.nonzero(is_new_nM.reshape(-1), as_tuple=False).squeeze(-1)
    row_end_S = (flat_start_S // num_draws + 1) * num_draws
    next_start_S = torch.cat([flat_start_S[1:], flat_start_S.new_tensor([draws_nM.numel()])])
    counts_S = torch.minimum(next_start_S, row_end_S) - flat_start_S
    return ids_S, counts_S, sizes_n


@torch.no_grad()
def compute_targets(
    hidden_ND: torch.Tensor,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    spec: TargetSpec,
    uniforms_NM: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    config: SelectionConfig = SelectionConfig(),
) -> PositionTargets:
    """Targets for every row of `hidden_ND` (the caller drops the last position
    of each sequence, which has no next token)."""
    return selection(spec).compute(hidden_ND, logits_fn, spec, uniforms_NM, chunk_size, config)


class Selection:
    """The teacher side of a target kind (common.targets): what the device
    computes for each position and how the flat results become each row's
    `RowTargets`."""

    mode: ClassVar[str]  # the TargetKind's mode

    def uniforms(self, spec: TargetSpec, row_id: int, num_positions: int) -> np.ndarray | None:
        """The row's uniforms, [P, M], where the kind draws (see `row_uniforms`)."""
        return None

    def flat_uniforms(self, spec: TargetSpec, rows: Sequence[tuple[int, int]]) -> torch.Tensor | None:
        """The uniforms of rows given as (row id, positions), concatenated ([N, M] float64)."""
        return None

    def compute(self, hidden_ND, logits_fn, spec: TargetSpec, uniforms_NM, chunk_size: int,
                config: SelectionConfig) -> PositionTargets:
        raise NotImplementedError

    def split_rows(self, targets: PositionTargets, num_positions: Sequence[int]) -> list[RowTargets]:
        """Targets on the CPU for consecutive rows of `num_positions` each, split into
        each row's `TeacherRow.targets`."""
        raise NotImplementedError

    def host_arrays(self, targets: PositionTargets) -> dict[str, torch.Tensor]:
        """Narrowest dtypes for the trip to the host (ids < 2^31, counts <= 65535)."""
        raise NotImplementedError

    def step_slices(self, host: dict[str, torch.Tensor]) -> Callable[[int, int], dict[str, np.ndarray]]:
        """For a step's `host_arrays`: positions [lo, hi) -> their arrays."""
        raise NotImplementedError

    def row_buffer(self, spec: TargetSpec, row_id: int, num_positions: int) -> "RowBuffer":
        raise NotImplementedError


class RowBuffer:
    """One row's targets filled by position from several steps (vLLM splits a
    prompt over steps and may recompute it from an earlier position, so a
    write overwrites rather than appends)."""

    uniforms_PM: np.ndarray | None = None

    def uniforms(self, start: int, stop: int) -> np.ndarray | None:
        return None if self.uniforms_PM is None else self.uniforms_PM[start:stop]

    def write(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """`step_slices` of positions start, start + 1, ..."""
        raise NotImplementedError

    def finish(self) -> RowTargets:
        """The whole row's targets, as `TeacherRow.targets`."""
        raise NotImplementedError


class TopkSelection(Selection):
    mode = "topk"

    def compute(self, hidden_ND, logits_fn, spec, uniforms_NM, chunk_size, config) -> PositionTargets:
        parts = []
        for start in range(0, hidden_ND.shape[0], chunk_size):
            logits_nV = logits_fn(hidden_ND[start:start + chunk_size])
            parts.append(_topk_chunk(logits_nV, spec, config))
            del logits_nV
        if not parts:
            empty = hidden_ND.new_zeros((0, spec.k), dtype=torch.float32)
            return PositionTargets(empty.long(), empty, hidden_ND.new_zeros((0, len(spec.temperatures)), dtype=torch.float32))
        ids, logits, lse = (torch.cat(p) for p in zip(*parts))
        return PositionTargets(topk_ids_NK=ids, topk_logits_NK=logits, lse_NT=lse)

    def split_rows(self, targets, num_positions) -> list[TopkRowTargets]:
        total_positions = sum(num_positions)
        assert targets.topk_ids_NK.shape[0] == total_positions, (targets.topk_ids_NK.shape, total_positions)
        ids_NK = targets.topk_ids_NK.numpy()
        logits_NK = targets.topk_logits_NK.float().numpy()
        lse_NT = targets.lse_NT.float().numpy()
        rows, pos = [], 0
        for n in num_positions:
            rows.append(TopkRowTargets(ids_PK=ids_NK[pos:pos + n], logits_PK=logits_NK[pos:pos + n],
                                       lse_PT=lse_NT[pos:pos + n]))
            pos += n
        return rows

    def host_arrays(self, targets) -> dict[str, torch.Tensor]:
        return {"topk_ids": targets.topk_ids_NK.to(torch.int32), "topk_logits": targets.topk_logits_NK.float(),
                "lse": targets.lse_NT.float()}

    def step_slices(self, host):
        return lambda lo, hi: {name: host[name][lo:hi].numpy() for name in ("topk_ids", "topk_logits", "lse")}

    def row_buffer(self, spec, row_id, num_positions) -> "TopkRowBuffer":
        return TopkRowBuffer(spec, num_positions)


class TopkRowBuffer(RowBuffer):
    def __init__(self, spec: TargetSpec, num_positions: int):
        self.ids_PK = np.zeros((num_positions, spec.k), dtype=np.int32)
        self.logits_PK = np.zeros((num_positions, spec.k), dtype=np.float32)
        self.lse_PT = np.zeros((num_positions, len(spec.temperatures)), dtype=np.float32)

    def write(self, start, arrays) -> None:
        stop = start + len(arrays["topk_ids"])
        self.ids_PK[start:stop] = arrays["topk_ids"]
        self.logits_PK[start:stop] = arrays["topk_logits"]
        self.lse_PT[start:stop] = arrays["lse"]

    def finish(self) -> TopkRowTargets:
        return TopkRowTargets(ids_PK=self.ids_PK, logits_PK=self.logits_PK, lse_PT=self.lse_PT)


class SampledSelection(Selection):
    mode = "sampled"

    def uniforms(self, spec, row_id, num_positions) -> np.ndarray:
        return row_uniforms(spec.seed, row_id, num_positions, spec.num_samples)

    def flat_uniforms(self, spec, rows) -> torch.Tensor:
        if not rows:
            return torch.zeros((0, spec.num_samples), dtype=torch.float64)
        return torch.from_numpy(np.concatenate([self.uniforms(spec, row_id, n) for row_id, n in rows], axis=0))

    def compute(self, hidden_ND, logits_fn, spec, uniforms_NM, chunk_size, config) -> PositionTargets:
        if uniforms_NM is None or uniforms_NM.shape[0] != hidden_ND.shape[0]:
            raise ValueError("sampled targets need one row of uniforms per position")
        parts = []
        for start in range(0, hidden_ND.shape[0], chunk_size):
            logits_nV = logits_fn(hidden_ND[start:start + chunk_size]).float()
            parts.append(_sample_chunk(logits_nV, uniforms_NM[start:start + chunk_size].to(logits_nV.device)))
            del logits_nV
        if not parts:
            empty = hidden_ND.new_zeros(0, dtype=torch.long)
            return PositionTargets(sample_ids_S=empty, sample_counts_S=empty, sample_sizes_N=empty)
        ids, counts, sizes = (torch.cat(p) for p in zip(*parts))
        return PositionTargets(sample_ids_S=ids, sample_counts_S=counts, sample_sizes_N=sizes)

    def split_rows(self, targets, num_positions) -> list[SampledRowTargets]:
        sizes_N = targets.sample_sizes_N.numpy().astype(np.int64)
        assert len(sizes_N) == sum(num_positions), (len(sizes_N), sum(num_positions))
        ids_S, counts_S = targets.sample_ids_S.numpy(), targets.sample_counts_S.numpy()
        offsets = np.concatenate([[0], np.cumsum(sizes_N)])
        rows, pos = [], 0
        for n in num_positions:
            lo, hi = offsets[pos], offsets[pos + n]
            rows.append(SampledRowTargets(sizes_P=sizes_N[pos:pos + n], ids_S=ids_S[lo:hi], counts_S=counts_S[lo:hi]))
            pos += n
        return rows

    def host_arrays(self, targets) -> dict[str, torch.Tensor]:
        return {"sample_sizes": targets.sample_sizes_N.to(torch.int32),
                "sample_ids": targets.sample_ids_S.to(torch.int32),
                "sample_counts": targets.sample_counts_S.to(torch.int32)}

    def step_slices(self, host):
        sizes_N = host["sample_sizes"].numpy()
        entry_start_N = np.concatenate([[0], np.cumsum(sizes_N)])
        ids_S, counts_S = host["sample_ids"].numpy(), host["sample_counts"].numpy()

        def positions(lo: int, hi: int) -> dict[str, np.ndarray]:
            s0, s1 = entry_start_N[lo], entry_start_N[hi]
            return {"sample_sizes": sizes_N[lo:hi].copy(), "sample_ids": ids_S[s0:s1].copy(),
                    "sample_counts": counts_S[s0:s1].copy()}

        return positions

    def row_buffer(self, spec, row_id, num_positions) -> "SampledRowBuffer":
        return SampledRowBuffer(row_id, num_positions, self.uniforms(spec, row_id, num_positions))


class SampledRowBuffer(RowBuffer):
    def __init__(self, row_id: int, num_positions: int, uniforms_PM: np.ndarray):
        self.row_id, self.num_positions, self.uniforms_PM = row_id, num_positions, uniforms_PM
        # start position -> the arrays of the positions computed in one step
        self.pieces: dict[int, dict[str, np.ndarray]] = {}

    def write(self, start, arrays) -> None:
        if not len(arrays["sample_sizes"]):
            return
        for stale in [s for s in self.pieces if s >= start]:
            del self.pieces[stale]
        self.pieces[start] = arrays

    def finish(self) -> SampledRowTargets:
        starts = sorted(self.pieces)
        pieces = [self.pieces[s] for s in starts]
        covered = sum(len(p["sample_sizes"]) for p in pieces)
        assert covered == self.num_positions, (self.row_id, starts, covered)
        for a, b, piece in zip(starts, starts[1:], pieces):
            assert a + len(piece["sample_sizes"]) == b, (self.row_id, starts)
        cat = (lambda name: np.concatenate([p[name] for p in pieces]).astype(np.int32)
               if pieces else np.zeros(0, dtype=np.int32))
        # sizes as int64, as `split_rows` gives them
        return SampledRowTargets(sizes_P=cat("sample_sizes").astype(np.int64), ids_S=cat("sample_ids"),
                                 counts_S=cat("sample_counts"))


SELECTIONS: dict[str, Selection] = {s.mode: s for s in (TopkSelection(), SampledSelection())}


def selection(spec: TargetSpec) -> Selection:
    """The teacher side of the spec's target kind."""
    return SELECTIONS[spec.kind.mode]
