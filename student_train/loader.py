"""Training data loader: teacher-cache shards -> StudentBatch, per data-parallel rank.

Order. Epoch e is a pure function of (seed, e, the rows' lengths, micro_batch,
world_size, length_window): a seeded permutation of the cache's rows is cut
into windows of `length_window` global steps (one global step is world_size x
micro_batch rows); inside a window rows are sorted by length, cut into micro
batches (consecutive micro batches go to consecutive ranks of one step, so the
ranks of a step also get similar lengths), and the window's steps are
shuffled. Every rank computes the same plan and takes its own column of it,
so ranks read disjoint rows and all get `batches_per_epoch` micro batches.

Leftovers. With shuffle on, the last `num_rows % (world_size * micro_batch)`
rows of an epoch's permutation are skipped for that epoch (the next epoch
permutes again, so no row is skipped systematically). With shuffle off (eval)
every row is read once: the last step is completed with filler rows, copies
of the epoch's first rows with row id -1, labels all -100 and no hidden mask,
so they add nothing to any loss or count.

Integrity. Every row read is compared with the checksums stored with it (one
CRC-32 per cell), in the decode thread or process: a changed byte stops
training with the shard, row and column named. Row content hashes are
recomputed from the tokens as well (`verify_content`).

Decoding runs in background threads, at most `prefetch` micro batches ahead;
each thread keeps its own open shard readers. With `decode_processes` > 0 it
runs in that many worker processes instead: they build batches in shared
memory, and a loader thread of this process copies each into pinned memory,
so the training loop shares its GIL with nothing but that copy.

Packing (`pack`). Rows are packed once into bins of at most seq_len tokens
(student_train/packing.py); an epoch is then a seeded permutation of the bins,
cut into steps as above, and every micro batch is [micro_batch, seq_len] with
position ids restarting at each row.

The state is (epoch, position): the number of micro batches this rank has
handed out, so a loader restored from it yields exactly the batches the
original would have yielded next.

Shape suffixes: N rows of the cache, B rows of a batch, L tokens, P = L - 1
target positions, K top-k width, T temperatures, M sampled ids, D hidden size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import multiprocessing
import threading
import weakref
from collections import OrderedDict, deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from common.causal_lm import IGNORE_INDEX
from common.cache_dir import CacheDir
from common.manifest import CacheManifest
from common.parent_death import die_with_parent
from common.shard_format import ShardFormatError, TeacherRow, read_columns, warn_unchecked_rows
from common.row_columns import CHANNELS
from common.shard_reader import ShardReader, check_content_hash
from common.spec import ShardSpec
from student_train.batch import PAD_TOKEN_ID, StudentBatch
from student_train.packing import EMPTY, pack_rows, packed_position_ids, plan_packed_epoch
from student_train.row_map import RowMap, build_row_map

_ORDER_TAG = 0x4C4F4144  # keeps the loader's random stream apart from other users of the seed
_MAX_OPEN_SHARDS = 32  # per decode thread


@dataclass(kw_only=True)
class LoaderSettings:
    """How rows are read into micro batches; the train config's `data` section adds its caches and
    batch sizes (student_train/config.py)."""

    micro_batch: int = 1
    seq_len: int = 4096  # rows longer than this: ValueError naming the shard and row id
    seed: int = 0
    shuffle: bool = True
    num_threads: int = 2  # background decode threads
    # > 0: decode in this many worker processes per rank instead of num_threads threads (no decoder
    # shares the training loop's GIL; on one H100 neither was faster, see docs/BENCHMARKS.md).
    # Eval always decodes in threads.
    decode_processes: int = 0
    prefetch: int = 4  # micro batches decoded ahead
    length_window: int = 64  # sort rows by length inside windows of this many global steps
    verify_content: bool = True  # recompute each row's content hash from its input_ids
    # Micro batches padded to a multiple of this many tokens: a compiled step then sees a few
    # shapes instead of one per length (pads are masked out of every loss; compiled steps: 256).
    pad_to_multiple: int = 1
    # Several rows back to back in each batch row of exactly seq_len tokens (student_train/packing.py).
    pack: bool = False

    def __post_init__(self):
        for key in ("micro_batch", "num_threads", "prefetch", "length_window", "pad_to_multiple"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key}: must be an int >= 1, got {value!r}")
        # A row of one token has no next token to predict.
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"seq_len: must be an int >= 2, got {self.seq_len!r}")
        if not isinstance(self.decode_processes, int) or self.decode_processes < 0:
            raise ValueError(f"decode_processes: must be 0 (decode in threads) or a process count, "
                             f"got {self.decode_processes!r}")

    def settings(self) -> dict:
        """The LoaderSettings fields of this config, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(LoaderSettings)}


@dataclass
class LoaderConfig(LoaderSettings):
    cache_dir: str
    hidden_layers: tuple[int, ...] = ()  # teacher layers to read (only these columns are decoded)
    pin_memory: bool | None = None  # default: torch.cuda.is_available()
    max_samples: int | None = None  # eval: only the first N rows, in cache order, never shuffled
    verify_checksums: bool = True  # compare each row's cells with their stored checksums (off: benchmarks only)

    def __post_init__(self):
        super().__post_init__()
        self.hidden_layers = tuple(int(layer) for layer in self.hidden_layers)
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or self.max_samples < 1):
            raise ValueError(f"loader max_samples must be an int >= 1 or None, got {self.max_samples!r}")
        if len(set(self.hidden_layers)) != len(self.hidden_layers):
            raise ValueError(f"loader hidden_layers has duplicates: {self.hidden_layers}")

    @property
    def ordered(self) -> bool:
        """No shuffling: asked for, or implied by max_samples (eval reads the first rows)."""
        return not self.shuffle or self.max_samples is not None


def plan_epoch(lengths_N: np.ndarray, epoch: int, *, micro_batch: int, world_size: int, seed: int,
               shuffle: bool, length_window: int) -> np.ndarray:
    """Row codes [steps, world_size, micro_batch] for one epoch; code c >= 0 is row c,
    c < 0 a filler copy of row -c - 1 (see the module docstring)."""
    num_rows = len(lengths_N)
    rows_per_step = world_size * micro_batch
    rng = np.random.Generator(np.random.PCG64([seed, epoch, _ORDER_TAG]))
    if shuffle:
        order = rng.permutation(num_rows)
        order = order[: num_rows - num_rows % rows_per_step]
    else:
        order = np.arange(num_rows)
        short = -num_rows % rows_per_step
        order = np.concatenate([order, -np.resize(order, short) - 1])
    window_rows = length_window * rows_per_step
    steps = []
    for start in range(0, len(order), window_rows):
        codes = order[start:start + window_rows]
        rows = np.where(codes >= 0, codes, -codes - 1)
        codes = codes[np.argsort(lengths_N[rows], kind="stable")]
        window_steps = codes.reshape(-1, world_size, micro_batch)
        if shuffle:
            window_steps = window_steps[rng.permutation(len(window_steps))]
        steps.append(window_steps)
    if not steps:
        return np.zeros((0, world_size, micro_batch), dtype=np.int64)
    return np.concatenate(steps).astype(np.int64)


class _BatchDecoder:
    """Reads and assembles micro batches; runs in the decode threads, holds no loader reference."""

    def __init__(self, rows: RowMap, spec: ShardSpec, columns: list[str], hidden_layers: tuple[int, ...],
                 verify_content: bool, verify_checksums: bool, pin_memory: bool, shared_memory: bool = False,
                 pad_to_multiple: int = 1, seq_len: int = 0):
        assert not (pin_memory and shared_memory)
        self.pad_to_multiple = pad_to_multiple
        self.seq_len = seq_len  # packed batch rows are exactly this long
        self.rows = rows
        self.spec = spec
        self.columns = columns
        self.hidden_layers = hidden_layers
        self.verify_content = verify_content
        self.verify_checksums = verify_checksums
        self.pin_memory = pin_memory
        self.shared_memory = shared_memory  # in a decode process: batches go back through shared memory
        self._local = threading.local()

    def __getstate__(self):  # sent to decode processes: no thread-local readers
        state = dict(self.__dict__)
        del state["_local"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def _reader(self, shard: int) -> ShardReader:
        # Readers are not shared between threads; each thread keeps its most recent ones open.
        readers: OrderedDict[int, ShardReader] | None = getattr(self._local, "readers", None)
        if readers is None:
            readers = self._local.readers = OrderedDict()
        reader = readers.get(shard)
        if reader is None:
            reader = ShardReader(self.rows.paths[shard], columns=self.columns, entry=self.rows.entries[shard],
                                 verify_cells=self.verify_checksums)
            readers[shard] = reader
            if len(readers) > _MAX_OPEN_SHARDS:
                readers.popitem(last=False)[1].close()
        readers.move_to_end(shard)
        return reader

    def read_row(self, n: int) -> TeacherRow:
        shard = int(self.rows.shard_N[n])
        path = self.rows.paths[shard]
        row = self._reader(shard).read_row(int(self.rows.index_N[n]), hidden_stored=True)
        expected_id, expected_len = int(self.rows.row_id_N[n]), int(self.rows.length_N[n])
        if row.row_id != expected_id or row.num_tokens != expected_len:
            raise ShardFormatError(f"{path}: row {expected_id} changed since the loader opened the cache")
        if self.verify_content:
            check_content_hash(row, path)
        num_pos = row.num_positions
        covered = self.spec.targets.kind.num_positions(row)
        if covered != num_pos:
            raise ShardFormatError(f"{path}: row {row.row_id}: targets cover {covered} positions, "
                                   f"the row has {row.num_tokens} tokens (expected {num_pos})")
        if self.hidden_layers and row.hidden_positions_H is not None and len(row.hidden_positions_H) and (
                row.hidden_positions_H.min() < 0 or row.hidden_positions_H.max() >= row.num_tokens):
            raise ShardFormatError(f"{path}: row {row.row_id}: hidden position outside the row")
        return row

    @contextlib.contextmanager
    def _naming_row(self, n: int):
        """Errors other than the format's own (which name their row already) get the row named."""
        try:
            yield
        except ValueError:
            raise
        except Exception as exc:
            path = self.rows.paths[int(self.rows.shard_N[n])]
            raise RuntimeError(f"{path}: row {int(self.rows.row_id_N[n])}: {type(exc).__name__}: {exc}") from exc

    def decode(self, codes: np.ndarray) -> StudentBatch:
        """codes [B] (one row per batch row; c < 0 a filler copy of row -c - 1) or, packed,
        [B, R] (the rows of each batch row, EMPTY-padded)."""
        packed = codes.ndim == 2
        codes_BR = codes if packed else codes[:, None]
        slots = []  # per batch row: (row number, filler, row)
        for bin_R in codes_BR:
            entries = []
            for c in bin_R:
                if c == EMPTY:
                    continue
                n = int(c if c >= 0 else -c - 1)
                with self._naming_row(n):
                    entries.append((n, bool(c < 0), self.read_row(n)))
            slots.append(entries)
        rows = [row for entries in slots for _, _, row in entries]
        B, R = codes_BR.shape
        if packed:
            L = self.seq_len
        else:
            L = -(-max(r.num_tokens for r in rows) // self.pad_to_multiple) * self.pad_to_multiple
        P = max(L - 1, 0)
        pin, shared = self.pin_memory, self.shared_memory

        def full(shape, value, dtype):
            if shared:  # allocated in shared memory, so sending it to the loader copies nothing
                storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
                tensor = torch.empty(0, dtype=dtype).set_(storage).view(shape)
            else:
                tensor = torch.empty(shape, dtype=dtype, pin_memory=pin)
            _np(tensor).fill(value)
            return tensor

        batch = StudentBatch(
            row_ids_BR=full((B, R), -1, torch.int64),
            input_ids_BL=full((B, L), PAD_TOKEN_ID, torch.int64),
            attention_mask_BL=full((B, L), 0, torch.int64),
            labels_BL=full((B, L), IGNORE_INDEX, torch.int64),
            position_ids_BL=full((B, L), 0, torch.int64) if packed else None,
            channels_BL=full((B, L), -1, torch.int64) if CHANNELS in self.spec.columns else None,
            source_ids_BL=full((B, L), -1, torch.int64) if self.rows.source_id_N is not None else None,
        )
        batch.targets = self.spec.targets.kind.batch_targets(rows, self.spec, B, P, full)
        if self.hidden_layers:
            D = self.spec.hidden.hidden_size
            # The stored form goes to the device as is: fp8 is a quarter of float32's bytes and
            # its dequantization is one fused op there instead of CPU work in the decode threads.
            if self.spec.hidden.dtype == "fp8":
                batch.teacher_hidden = {layer: full((B, L, D), 0, torch.uint8) for layer in self.hidden_layers}
                batch.teacher_hidden_scale = {layer: full((B, L), 0.0, torch.float32) for layer in self.hidden_layers}
            else:
                batch.teacher_hidden = {layer: full((B, L, D), 0.0, torch.bfloat16) for layer in self.hidden_layers}
            batch.hidden_mask_BL = full((B, L), False, torch.bool)
        for b, entries in enumerate(slots):
            start = 0
            for r, (n, filler, row) in enumerate(entries):
                with self._naming_row(n):
                    self._fill_row(batch, b, r, start, row, filler)
                    if not filler and batch.source_ids_BL is not None:
                        _np(batch.source_ids_BL)[b, start:start + row.num_tokens] = self.rows.source_id_N[n]
                start += row.num_tokens
            if packed:
                _np(batch.position_ids_BL)[b] = packed_position_ids([row.num_tokens for _, _, row in entries], L)
        return batch

    def _fill_row(self, batch: StudentBatch, b: int, r: int, start: int, row: TeacherRow, filler: bool) -> None:
        """Row `row` into batch row b from token `start` on (0 unless packed)."""
        n = row.num_tokens
        end = start + n
        _np(batch.input_ids_BL)[b, start:end] = row.input_ids_L
        _np(batch.attention_mask_BL)[b, start:end] = 1
        if filler:
            return  # same tokens as a real row, but nothing to learn from or count
        _np(batch.row_ids_BR)[b, r] = row.row_id
        _np(batch.labels_BL)[b, start:end] = row.labels_L
        if start > 0:
            # A row's first token is no target of its own row, and the previous packed row's
            # last position must not learn to predict it.
            _np(batch.labels_BL)[b, start] = IGNORE_INDEX
        batch.num_tokens += n
        if batch.channels_BL is not None:
            _np(batch.channels_BL)[b, start:end] = row.channels_L
        batch.targets.fill_row(b, row.targets, start)
        if self.hidden_layers:
            positions_H = row.hidden_positions_H
            if not self.spec.hidden.subset:
                where = slice(start, end)  # every position is stored: a plain copy, no scatter
            else:
                where = start + positions_H.astype(np.int64)
            for layer in self.hidden_layers:
                # fp8 bytes straight from the shard's buffer, or bf16 bits
                _np(batch.teacher_hidden[layer])[b, where] = _np(row.hidden[layer])
                if layer in batch.teacher_hidden_scale:
                    _np(batch.teacher_hidden_scale[layer])[b, where] = row.hidden_scales[layer]
            _np(batch.hidden_mask_BL)[b, where] = True


_process_decoder: _BatchDecoder | None = None  # this decode process's decoder


def _start_decode_process(decoder: _BatchDecoder) -> None:
    global _process_decoder
    die_with_parent()  # a killed rank leaves no decoders behind
    torch.set_num_threads(1)  # decoding is numpy work; no OpenMP team per process
    _process_decoder = decoder


def _decode_in_process(codes_B: np.ndarray) -> StudentBatch:
    assert _process_decoder is not None
    return _process_decoder.decode(codes_B)


def _mp_context():
    # Not fork: the training process holds CUDA and communication threads by now.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _np(x):
    """A numpy view of a CPU tensor (bf16 as its int16 bits); arrays pass through.

    Decode threads fill batches through numpy: its copies run without the GIL
    and on the calling thread alone, where torch's CPU ops on these sizes
    start an OpenMP team per calling thread, so several decode threads would
    oversubscribe the cores the training loop launches kernels from."""
    if isinstance(x, np.ndarray):
        return x
    return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()


def _received(decoded: Future, pin: bool) -> StudentBatch:
    try:
        batch = decoded.result()
    except BrokenProcessPool as exc:
        raise RuntimeError("a loader decode process died (killed, or out of host memory?); "
                           "data.decode_processes=0 decodes in threads instead") from exc
    return batch.pin_memory() if pin else batch


def _shutdown(threads: ThreadPoolExecutor, processes: ProcessPoolExecutor) -> None:
    for executor in (processes, threads):
        executor.shutdown(wait=False, cancel_futures=True)


class CacheLoader:
    """Endless, resumable, rank-sharded micro batches from a teacher cache (see module docstring)."""

    def __init__(self, config: LoaderConfig, rank: int = 0, world_size: int = 1,
                 expected_vocab_size: int | None = None):
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"loader needs 0 <= rank < world_size, got rank {rank} of {world_size}")
        self.config = config
        self.rank, self.world_size = rank, world_size
        cache = CacheDir(config.cache_dir)
        cache_dir = cache.path
        self.manifest: CacheManifest = cache.manifest()
        self.spec: ShardSpec = self.manifest.spec
        if config.verify_checksums:
            warn_unchecked_rows(self.spec, str(cache_dir))
        if expected_vocab_size is not None and expected_vocab_size != self.spec.vocab_size:
            raise ValueError(f"{cache_dir}: the cache's vocabulary has {self.spec.vocab_size} ids, the student's "
                             f"has {expected_vocab_size}")
        missing = [layer for layer in config.hidden_layers if layer not in self.spec.hidden.layers]
        if missing:
            raise ValueError(f"{cache_dir}: teacher hidden layer(s) {missing} not in the cache "
                             f"(it stores {list(self.spec.hidden.layers)})")
        pin = torch.cuda.is_available() if config.pin_memory is None else config.pin_memory
        if pin and not torch.cuda.is_available():
            raise ValueError("loader pin_memory=True needs CUDA")

        self._executor = ThreadPoolExecutor(config.num_threads, thread_name_prefix=f"vpmoe-loader-{id(self):x}")
        # Threads stop when the loader is collected, even without close().
        self._finalizer = weakref.finalize(self, self._executor.shutdown, wait=False, cancel_futures=True)
        self._processes: ProcessPoolExecutor | None = None
        try:
            rows = build_row_map(cache, self.manifest, config.seq_len, self._executor)
        except BaseException:
            self.close()
            raise
        num_rows = len(rows.length_N) if config.max_samples is None else min(config.max_samples, len(rows.length_N))
        self._lengths_N = rows.length_N[:num_rows]
        # What a batch's source_ids_BL index (empty for a cache without sources)
        self.source_names: list[str] = rows.source_names
        # Packed, the units of an epoch are bins of rows, made once (student_train/packing.py).
        self._bins_GR = (pack_rows(self._lengths_N, config.seq_len, config.seed, shuffle=not config.ordered)
                         if config.pack else None)
        units = num_rows if self._bins_GR is None else len(self._bins_GR)
        per_step = world_size * config.micro_batch
        self.batches_per_epoch = units // per_step if not config.ordered else -(-units // per_step)
        if self.batches_per_epoch == 0:
            self.close()
            what = "rows" if self._bins_GR is None else f"packed batch rows (from {num_rows} rows)"
            raise ValueError(f"{cache_dir}: {units} {what} are fewer than one step of world_size x micro_batch "
                             f"= {per_step}")
        in_processes = config.decode_processes > 0
        # In decode processes batches are built in shared memory; this process pins them.
        self._decoder = _BatchDecoder(rows, self.spec, read_columns(self.spec, config.hidden_layers, config.verify_content),
                                      config.hidden_layers, config.verify_content, config.verify_checksums,
                                      pin_memory=pin and not in_processes, shared_memory=in_processes,
                                      pad_to_multiple=config.pad_to_multiple, seq_len=config.seq_len)
        self._pin = pin
        if in_processes:
            self._processes = ProcessPoolExecutor(config.decode_processes, mp_context=_mp_context(),
                                                  initializer=_start_decode_process, initargs=(self._decoder,))
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _shutdown, self._executor, self._processes)
        self._plans: OrderedDict[int, np.ndarray] = OrderedDict()
        self._epoch = self._position = 0
        self._active = None  # token of the iterator allowed to advance the state

    @property
    def num_rows(self) -> int:
        return len(self._lengths_N)

    def rank_plan(self, epoch: int) -> np.ndarray:
        """This rank's row codes for an epoch: [batches_per_epoch, micro_batch], or packed
        [batches_per_epoch, micro_batch, R]."""
        plan = self._plans.get(epoch)
        if plan is None:
            c = self.config
            if self._bins_GR is None:
                plan = plan_epoch(self._lengths_N, epoch, micro_batch=c.micro_batch, world_size=self.world_size,
                                  seed=c.seed, shuffle=not c.ordered, length_window=c.length_window)[:, self.rank]
            else:
                plan = plan_packed_epoch(self._bins_GR, epoch, micro_batch=c.micro_batch,
                                         world_size=self.world_size, seed=c.seed,
                                         shuffle=not c.ordered)[:, self.rank]
            assert plan.shape[:2] == (self.batches_per_epoch, c.micro_batch)
            self._plans[epoch] = plan
            if len(self._plans) > 2:
                self._plans.popitem(last=False)
        return plan

    def __iter__(self) -> Iterator[StudentBatch]:
        return self._batches(endless=True)

    def epoch_batches(self) -> Iterator[StudentBatch]:
        """The rest of the current epoch (all of it from a fresh or epoch-aligned state)."""
        return self._batches(endless=False)

    def _jobs(self, endless: bool):
        epoch, position = self._epoch, self._position
        for epoch in itertools.count(epoch) if endless else (epoch,):
            plan = self.rank_plan(epoch)
            for p in range(position, self.batches_per_epoch):
                yield epoch, p, plan[p]
            position = 0

    def _batches(self, endless: bool) -> Iterator[StudentBatch]:
        if not self._finalizer.alive:
            raise RuntimeError("the loader is closed")
        token = self._active = object()
        jobs = self._jobs(endless)
        pending: deque = deque()
        try:
            while True:
                while len(pending) < self.config.prefetch and (job := next(jobs, None)) is not None:
                    epoch, p, codes = job
                    pending.append((epoch, p, self._submit(codes)))
                if not pending:
                    return
                epoch, p, future = pending.popleft()
                batch = future.result()  # a decode error surfaces here, naming its shard and row
                if self._active is not token:
                    raise RuntimeError("this loader iterator was superseded by a newer one or by load_state_dict")
                p += 1
                self._epoch, self._position = (epoch, p) if p < self.batches_per_epoch else (epoch + 1, 0)
                yield batch
        finally:
            for *_, future in pending:
                future.cancel()

    def _submit(self, codes_B: np.ndarray) -> Future:
        if self._processes is None:
            return self._executor.submit(self._decoder.decode, codes_B)
        decoded = self._processes.submit(_decode_in_process, codes_B)
        # The copy into pinned memory runs on a loader thread (torch copies without the GIL).
        return self._executor.submit(_received, decoded, self._pin)

    def _fingerprint(self) -> dict:
        c = self.config
        fingerprint = {"seed": c.seed, "world_size": self.world_size, "micro_batch": c.micro_batch,
                       "num_rows": self.num_rows, "ordered": c.ordered, "length_window": c.length_window}
        if c.pack:  # only when on, so states saved before packing existed still load
            fingerprint.update(pack=True, seq_len=c.seq_len)
        return fingerprint

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "position": self._position, **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        fingerprint = self._fingerprint()
        for key in [*fingerprint, *(k for k in ("pack", "seq_len") if k in state and k not in fingerprint)]:
            value = fingerprint.get(key, False if key == "pack" else None)
            if state.get(key, False if key == "pack" else None) != value:
                raise ValueError(f"loader state key {key!r} is {state.get(key)!r}, this loader has {value!r}")
        epoch, position = state.get("epoch"), state.get("position")
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(position, int)
                and 0 <= position < self.batches_per_epoch):
            raise ValueError(f"loader state has epoch {epoch!r}, position {position!r}; "
                             f"need epoch >= 0 and 0 <= position < {self.batches_per_epoch}")
        self._epoch, self._position = epoch, position
        self._active = None

    def close(self) -> None:
        self._active = None
        self._finalizer.detach()
        if self._processes is not None:  # first: pin threads waiting on a cancelled decode return at once
            self._processes.shutdown(wait=True, cancel_futures=True)
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
