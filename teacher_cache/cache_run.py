"""`cache-teacher` orchestration: check inputs, agree on the cache header,
resume, run the backend through the writer pipeline, and join worker caches.

Order of work: the teacher's config and every selected source row are checked
before anything is written or any model is loaded. An existing cache must have
been made with the same teacher, targets, source and rows per shard (unless
--overwrite); its finished shards are verified (sidecar, size, sha256, row
range) and kept, anything partial is recomputed. The manifest is rebuilt from
the sidecars after each shard, under a lock, so workers can share a directory.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from rich.console import Console

from common.atomic import file_lock, publish, remove_stale_tmp, tmp_path_for
from common.manifest import (LOCK_NAME, MANIFEST_NAME, SIDECAR_SUFFIX, CacheManifest, ShardEntry, file_sha256,
                             load_manifest, read_sidecars, refresh_manifest, shard_file_name, write_manifest,
                             write_sidecar)
from common.parent_death import dies_with_this_process
from common.paths import is_within, overlap, overlap_error
from common import config_file
from common.spec import ShardSpec
from teacher_cache import spec_config
from teacher_cache.backend import BackendOptions, TeacherInfo, default_backend_name, make_backend, read_teacher_info
from teacher_cache.data import SourceConfig, SourceData, open_source
from teacher_cache.spec_config import HiddenConfig, TargetsConfig
from teacher_cache.pipeline import PipelineConfig, ProgressView, RunSummary, WriterPipeline
from teacher_cache.plan import (ShardPlan, WorkerSlot, auto_rows_per_shard, estimate_storage, node_local_worker, plan_shards,
                                resolve_worker, shards_for_worker)

# Seconds between manifest rebuilds while shards are being published (and once at the end).
MANIFEST_REFRESH_S = 30.0
# Teacher keys that may differ between runs writing one cache: where the model lives.
_TEACHER_LOCATION_KEYS = ("model",)
_SOURCE_LOCATION_KEYS = ("path",)


@dataclass
class CacheConfig:
    """`vpmoe cache-teacher`'s settings: the run's own keys and each component's section
    (`vpmoe cache-teacher --config cache.yaml --set section.key=value`; each flag overrides
    the key named in its field's metadata)."""

    out: str = field(default="", metadata={"flag": "--out"})  # the cache directory (created, resumed or merged into)
    seed: int = field(default=0, metadata={"flag": "--seed"})  # seed of sampled draws and hidden-position subsets
    # Rows per shard; 0: the existing cache's, else about 512 MiB of raw cells per shard (8-256 rows).
    rows_per_shard: int = field(default=0, metadata={"flag": "--rows-per-shard"})
    num_workers: int | None = field(default=None, metadata={"flag": "--num-workers"})  # workers (nodes); else env
    worker_index: int | None = field(default=None, metadata={"flag": "--worker-index"})  # this worker's; else env
    gpus: tuple[int, ...] = field(default=(), metadata={"flag": "--gpus"})  # one worker process per GPU of this node
    dry_run: bool = field(default=False, metadata={"flag": "--dry-run"})  # the plan and storage estimate only
    overwrite: bool = field(default=False, metadata={"flag": "--overwrite"})  # replace a cache made otherwise
    gpu_hour_price: float | None = field(default=None, metadata={"flag": "--gpu-hour-price"})  # for the summary
    quiet: bool = False  # no plan or summary (the per-GPU workers)
    teacher: BackendOptions = field(default_factory=BackendOptions)
    data: SourceConfig = field(default_factory=SourceConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    hidden: HiddenConfig = field(default_factory=HiddenConfig)
    writer: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self):
        self.gpus = tuple(int(g) for g in self.gpus)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Sequence[str] = (), **flags) -> "CacheConfig":
        """A config file (or the defaults), flag values by option name (`top_k=8` for `--top-k`;
        None: not given), then `--set` overrides."""
        return config_file.load(cls, path, overrides, raw=flag_keys(flags))

    @classmethod
    def from_flags(cls, **flags) -> "CacheConfig":
        """The defaults with flag values by option name (`CacheConfig.from_flags(model=..., top_k=8)`)."""
        return cls.load(None, (), **flags)

    def to_dict(self) -> dict:
        return config_file.to_raw(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "CacheConfig":
        return config_file.build(cls, json.loads(text), "", "config")


def flag_keys(values: dict) -> dict:
    """{option name with underscores: value} -> {dotted config key: value}, for the options given
    (not None); a name that is no flag may be a field's own key (`show_progress`)."""
    by_flag = {flag[2:].replace("-", "_"): key for flag, key in config_file.flags(CacheConfig).items()}
    raw = {}
    for name, value in values.items():
        if value is None:
            continue
        key = by_flag.get(name) or _leaf_key(name)
        raw[key] = value
    return raw


def _leaf_key(name: str) -> str:
    """The dotted key of the one field called `name`; ValueError if none or several."""
    found = [key for key in config_file.leaf_keys(CacheConfig) if key.rsplit(".", 1)[-1] == name]
    if len(found) != 1:
        raise ValueError(f"cache config: no single key {name!r} ({', '.join(found) or 'none'})")
    return found[0]


def build_spec(cfg: CacheConfig, info: TeacherInfo) -> ShardSpec:
    return spec_config.build_spec(cfg.targets, cfg.hidden, cfg.seed, info.vocab_size, info.num_layers,
                                  info.hidden_size)


@dataclass
class Prepared:
    """Everything known before any model work: checked inputs and the plan."""

    info: TeacherInfo
    source: SourceData
    spec: ShardSpec
    backend: str
    plan: list[ShardPlan]
    header: CacheManifest


def check_out_dir(out: Path) -> None:
    """ValueError for an --out that cannot become a cache directory (nothing is created here)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable")


def prepare(cfg: CacheConfig) -> Prepared:
    check_out_dir(Path(cfg.out))
    info = read_teacher_info(cfg.teacher.model, cfg.teacher.trust_remote_code)
    source = open_source(cfg.data.path, cfg.data.split, cfg.data.limit_rows)
    source.validate(info.vocab_size, info.max_context)
    spec = build_spec(cfg, info)
    backend = default_backend_name() if cfg.teacher.backend == "auto" else cfg.teacher.backend
    rows_per_shard = resolve_rows_per_shard(cfg, spec, source)
    plan = plan_shards(source.num_rows, rows_per_shard)
    header = CacheManifest(
        spec=spec,
        teacher={"model": cfg.teacher.model, "model_type": info.model_type, "config_hash": info.config_hash,
                 "weights_fingerprint": "dummy" if cfg.teacher.load_format == "dummy" else info.weights_fingerprint,
                 "backend": backend, "dtype": cfg.teacher.dtype},
        tokenizer={"vocab_size": info.vocab_size},
        source=source.describe(),
        work={"rows_per_shard": rows_per_shard, "num_rows": source.num_rows, "num_shards": len(plan)},
        config=dataclasses.replace(cfg, rows_per_shard=rows_per_shard).to_dict(),
    )
    return Prepared(info, source, spec, backend, plan, header)


def resolve_rows_per_shard(cfg: CacheConfig, spec: ShardSpec, source: SourceData) -> int:
    """`--rows-per-shard`, or for 0 (automatic) the value of the cache already in
    `--out` (so a resume never needs the flag), else about 512 MiB of raw cells per shard."""
    if cfg.rows_per_shard < 0:
        raise ValueError(f"--rows-per-shard must be >= 1 (or 0 for automatic), got {cfg.rows_per_shard}")
    if cfg.rows_per_shard:
        return cfg.rows_per_shard
    if not cfg.overwrite and (Path(cfg.out) / MANIFEST_NAME).is_file():
        existing = load_manifest(Path(cfg.out)).work.get("rows_per_shard")
        if isinstance(existing, int) and existing > 0:
            return existing
    return auto_rows_per_shard(spec, source.num_tokens / max(source.num_rows, 1))


def header_differences(existing: CacheManifest, header: CacheManifest) -> list[str]:
    """Names of what differs between two caches' identities (empty: same cache)."""
    diffs = []
    if existing.format_version != header.format_version:
        diffs.append(f"format version ({existing.format_version} -> {header.format_version})")
    elif existing.spec != header.spec:
        diffs.append("targets/hidden spec")
    for name, a, b, ignore in (("teacher", existing.teacher, header.teacher, _TEACHER_LOCATION_KEYS),
                               ("source", existing.source, header.source, _SOURCE_LOCATION_KEYS)):
        for key in sorted(set(a) | set(b)):
            if key not in ignore and a.get(key) != b.get(key):
                diffs.append(f"{name} {key} ({a.get(key)!r} -> {b.get(key)!r})")
    if existing.work.get("rows_per_shard") != header.work.get("rows_per_shard"):
        diffs.append(f"rows per shard ({existing.work.get('rows_per_shard')} -> {header.work.get('rows_per_shard')})")
    return diffs


def _remove_shard(cache_dir: Path, index: int) -> None:
    name = shard_file_name(index)
    (cache_dir / (name + ".json")).unlink(missing_ok=True)  # sidecar first: a shard without one is never trusted
    (cache_dir / name).unlink(missing_ok=True)
    remove_stale_tmp(cache_dir, name)


def _shard_indices_on_disk(cache_dir: Path) -> set[int]:
    indices = set()
    for p in cache_dir.glob("shard-*"):
        stem = p.name.split(".")[0]
        if stem[len("shard-"):].isdigit():
            indices.add(int(stem[len("shard-"):]))
    return indices


def finished_entry(cache_dir: Path, shard: ShardPlan) -> ShardEntry | None:
    """The shard's entry if it is complete and intact, else None."""
    name = shard_file_name(shard.index)
    sidecar, path = cache_dir / (name + ".json"), cache_dir / name
    if not sidecar.is_file() or not path.is_file():
        return None
    try:
        entry = ShardEntry.from_dict(json.loads(sidecar.read_text()), str(sidecar))
    except (ValueError, json.JSONDecodeError):
        return None
    if (entry.index, entry.row_start, entry.row_end, entry.file) != (shard.index, shard.row_start, shard.row_end, name):
        return None
    if path.stat().st_size != entry.bytes or file_sha256(path) != entry.sha256:
        return None
    return entry


def open_cache(cache_dir: Path, header: CacheManifest, plan: list[ShardPlan], mine: list[ShardPlan],
               worker: WorkerSlot, overwrite: bool) -> tuple[list[ShardPlan], list[ShardEntry]]:
    """Agree on the header, clean up, and split this worker's shards into
    (to compute, finished and verified)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(cache_dir / LOCK_NAME):
        has_manifest = (cache_dir / MANIFEST_NAME).is_file()
        existing = load_manifest(cache_dir) if has_manifest else None
        if existing is None and list(cache_dir.glob(f"shard-*{SIDECAR_SUFFIX}")):
            diffs = [f"no {MANIFEST_NAME} beside its shards"]
        else:
            diffs = header_differences(existing, header) if existing is not None else []
        if diffs:
            if not overwrite:
                raise ValueError(f"{cache_dir}: the existing cache differs: {'; '.join(diffs)}. "
                                 f"Pass --overwrite to replace it, or choose another --out")
            for index in _shard_indices_on_disk(cache_dir):
                _remove_shard(cache_dir, index)
        elif overwrite:
            for shard in mine:
                _remove_shard(cache_dir, shard.index)
        # A killed run can leave a half-written manifest; only a lock holder writes one.
        remove_stale_tmp(cache_dir, MANIFEST_NAME)
        if worker.index == 0:
            # Shards past the end of the plan (an earlier, larger --limit-rows) belong to nobody.
            for index in _shard_indices_on_disk(cache_dir):
                if index >= len(plan):
                    _remove_shard(cache_dir, index)
        write_manifest(cache_dir, dataclasses.replace(header, shards=read_sidecars(cache_dir)))
    todo, kept = [], []
    for shard in mine:
        entry = finished_entry(cache_dir, shard)
        if entry is not None:
            remove_stale_tmp(cache_dir, shard_file_name(shard.index))  # an interrupted rewrite of it
            kept.append(entry)
        else:
            _remove_shard(cache_dir, shard.index)
            todo.append(shard)
    return todo, kept


def _gpus_in_use(cfg: CacheConfig) -> int:
    import torch

    if cfg.gpus:
        return len(cfg.gpus)
    on_gpu = torch.cuda.is_available() and not cfg.teacher.device.startswith("cpu")
    return 1 if on_gpu else 0


def _format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def plan_report(cfg: CacheConfig, prep: Prepared, worker: WorkerSlot, workers_per_node: int = 1) -> list[str]:
    """The plan and storage estimate, printed before any model work (and alone by --dry-run)."""
    spec = prep.spec
    lengths = prep.source.lengths_R
    tokens = int(lengths.sum())
    estimate = estimate_storage(spec, tokens)
    t = spec.targets
    targets = t.kind.describe(t)
    lines = [
        f"teacher {cfg.teacher.model} ({prep.info.model_type}, {prep.info.num_layers} layers, hidden {prep.info.hidden_size}, "
        f"vocab {prep.info.vocab_size}), backend {prep.backend}",
        f"source {prep.source.path} split '{prep.source.split}': {prep.source.num_rows:,} rows, {tokens:,} tokens",
        f"targets: {targets}",
    ]
    if prep.source.num_rows == 0:
        why = ("--limit-rows 0 selects none of its rows" if prep.source.total_rows
               else f"split '{prep.source.split}' has no rows")
        lines.append(f"WARNING: {prep.source.path}: {why}; the cache will hold no shards and `vpmoe train` "
                     "refuses it")
    if spec.hidden.layers:
        lines.append(f"hidden layers {list(spec.hidden.layers)} in {spec.hidden.dtype}, "
                     f"token fraction {spec.hidden.token_fraction:g}")
    lines.append(f"{len(prep.plan)} shard(s) of {cfg.rows_per_shard} rows")
    for local in range(workers_per_node):
        slot = node_local_worker(worker, local, workers_per_node) if workers_per_node > 1 else worker
        mine = shards_for_worker(prep.plan, slot)
        rows = sum(s.num_rows for s in mine)
        mine_tokens = sum(int(lengths[s.row_start:s.row_end].sum()) for s in mine)
        gpu = f" (GPU {cfg.gpus[local]})" if cfg.gpus else ""
        lines.append(f"worker {slot.index}/{slot.count}{gpu}: {len(mine)} shard(s), {rows:,} rows, "
                     f"{mine_tokens:,} tokens")
    lines.append(f"estimated storage: {_format_bytes(estimate.total_bytes)} "
                 f"({estimate.bytes_per_token:,.1f} bytes/token: targets and tokens "
                 f"{estimate.target_bytes_per_token:,.1f}"
                 + (f", hidden {estimate.hidden_bytes_per_token_per_layer:,.1f} per layer" if spec.hidden.layers else "")
                 + ")")
    free = _free_bytes(Path(cfg.out).resolve())
    lines.append(f"free space at {cfg.out}: {_format_bytes(free)}"
                 + (" -- WARNING: less than the estimate" if free < estimate.total_bytes else ""))
    return lines


def _print(console: Console, lines: list[str]) -> None:
    for line in lines:
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def check_paths(cfg: CacheConfig) -> None:
    """The cache is written apart from what it is made from: --out neither is, holds, nor lies inside
    --data, and a local teacher directory does not lie inside --out."""
    if overlap(cfg.out, cfg.data.path):
        raise overlap_error("--out", cfg.out, "--data", cfg.data.path,
                            "the cache must be written outside the dataset, and the dataset must not lie inside it")
    if Path(cfg.teacher.model).expanduser().exists() and is_within(cfg.teacher.model, cfg.out):
        raise overlap_error("--model", cfg.teacher.model, "--out", cfg.out, "the teacher must not lie inside the cache")


def run_cache(cfg: CacheConfig, console: Console | None = None) -> RunSummary | None:
    """Run (or dry-run) one cache-teacher invocation; returns the summary of a real run."""
    check_paths(cfg)
    console = console or Console()
    if cfg.gpus:
        return _run_gpus(cfg, console)
    prep = prepare(cfg)
    cfg = dataclasses.replace(cfg, rows_per_shard=prep.header.work["rows_per_shard"])  # automatic size resolved
    worker = resolve_worker(cfg.num_workers, cfg.worker_index)
    if not cfg.quiet:
        _print(console, plan_report(cfg, prep, worker))
    if cfg.dry_run:
        _print(console, ["dry run: nothing written"])
        return None
    out = Path(cfg.out)
    mine = shards_for_worker(prep.plan, worker)
    todo, kept = open_cache(out, prep.header, prep.plan, mine, worker, cfg.overwrite)
    summary = RunSummary(shards_skipped=len(kept), num_gpus=_gpus_in_use(cfg), gpu_hour_price=cfg.gpu_hour_price)
    start = time.monotonic()
    if todo:
        _write_shards(cfg, prep, out, todo, summary)  # refreshes the manifest as it goes and at its end
    else:
        refresh_manifest(out, prep.header)
    summary.seconds = time.monotonic() - start
    if not cfg.quiet:
        _print(console, summary.lines())
    return summary


def _write_shards(cfg: CacheConfig, prep: Prepared, out: Path, todo: list[ShardPlan], summary: RunSummary) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    progress = ProgressView(sum(s.num_rows for s in todo), enabled=cfg.writer.show_progress and not cfg.quiet)
    pipeline = WriterPipeline(out, prep.spec, cfg.writer, progress)
    backend = None
    try:
        backend = make_backend(prep.backend, prep.spec, dataclasses.replace(cfg.teacher, rows_per_shard=cfg.rows_per_shard))
        if backend.info.config_hash != prep.info.config_hash:
            raise ValueError(f"{cfg.teacher.model}: the backend loaded a different config than was checked")
        # One backend run over every shard's rows: the backend never drains at a shard
        # boundary, and each shard is published by its writer thread (which calls
        # shard_done) while the backend goes on with the next ones.
        source_rows = itertools.chain.from_iterable(prep.source.rows(s.row_start, s.row_end) for s in todo)
        last_refresh = [-math.inf]

        def shard_done(entry: ShardEntry) -> None:
            # The sidecars are what a resume trusts; the manifest is rebuilt from all of
            # them, so it is refreshed every so often, not per shard (thousands of shards).
            if time.monotonic() - last_refresh[0] >= MANIFEST_REFRESH_S:
                refresh_manifest(out, prep.header)
                last_refresh[0] = time.monotonic()
            summary.shards += 1
            summary.rows += entry.rows
            summary.tokens += entry.tokens
            summary.bytes += entry.bytes

        try:
            pipeline.write_shards(todo, backend.run(source_rows), on_shard=shard_done)
        finally:
            refresh_manifest(out, prep.header)  # every shard finished so far, whatever happened
    finally:
        if backend is not None:
            backend.close()
        pipeline.close()
        progress.close()


# ---- one worker process per GPU ------------------------------------------------

def _run_gpus(cfg: CacheConfig, console: Console) -> RunSummary | None:
    """Spawn one worker per GPU of this node (CUDA_VISIBLE_DEVICES); worker
    index = node worker * GPUs + local index. Inputs are checked here first."""
    if len(set(cfg.gpus)) != len(cfg.gpus):
        raise ValueError(f"--gpus lists a GPU twice: {cfg.gpus}")
    prep = prepare(cfg)
    cfg = dataclasses.replace(cfg, rows_per_shard=prep.header.work["rows_per_shard"])
    node = resolve_worker(cfg.num_workers, cfg.worker_index)
    if not cfg.quiet:
        _print(console, plan_report(cfg, prep, node, workers_per_node=len(cfg.gpus)))
    if cfg.dry_run:
        _print(console, ["dry run: nothing written"])
        return None
    out = Path(cfg.out)
    slots = [node_local_worker(node, local, len(cfg.gpus)) for local in range(len(cfg.gpus))]
    node_shards = {s.index for slot in slots for s in shards_for_worker(prep.plan, slot)}
    before = {e.index for e in read_sidecars(out)} if out.is_dir() else set()
    start = time.monotonic()
    procs = []
    for gpu, slot in zip(cfg.gpus, slots):
        child = dataclasses.replace(cfg, gpus=(), num_workers=slot.count, worker_index=slot.index, quiet=True,
                                    writer=dataclasses.replace(cfg.writer, show_progress=False),
                                    teacher=dataclasses.replace(cfg.teacher, device="auto"))
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
        procs.append((gpu, subprocess.Popen([sys.executable, "-m", "teacher_cache.cache_run", child.to_json()],
                                            env=env, preexec_fn=dies_with_this_process())))
    total_rows = sum(s.num_rows for s in prep.plan if s.index in node_shards)
    progress = ProgressView(total_rows, enabled=cfg.writer.show_progress and not cfg.quiet, description="caching (node)")
    try:
        while any(p.poll() is None for _, p in procs):
            _report_sidecars(out, node_shards, progress)
            time.sleep(1.0)
        _report_sidecars(out, node_shards, progress)
    finally:
        progress.close()
    failed = [(gpu, p.returncode) for gpu, p in procs if p.returncode != 0]
    if failed:
        raise RuntimeError("worker(s) failed: " + ", ".join(f"GPU {g} exit code {rc}" for g, rc in failed)
                           + "; rerun the same command to resume")
    written = [e for e in read_sidecars(out) if e.index in node_shards and e.index not in before]
    summary = RunSummary(shards=len(written), rows=sum(e.rows for e in written), tokens=sum(e.tokens for e in written),
                         bytes=sum(e.bytes for e in written), shards_skipped=len(node_shards & before),
                         seconds=time.monotonic() - start, num_gpus=len(cfg.gpus), gpu_hour_price=cfg.gpu_hour_price)
    if not cfg.quiet:
        _print(console, summary.lines())
    return summary


def _report_sidecars(out: Path, node_shards: set[int], progress: ProgressView) -> None:
    if not out.is_dir():
        return
    done = [e for e in read_sidecars(out) if e.index in node_shards]
    progress.set_totals(rows=sum(e.rows for e in done), tokens=sum(e.tokens for e in done),
                        bytes_=sum(e.bytes for e in done))


# ---- merging caches written by separate workers ---------------------------------

@dataclass
class MergeReport:
    shards_added: int = 0
    shards_present: int = 0
    missing: list[int] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"merged: {self.shards_added} shard(s) added, {self.shards_present} already present"]
        if self.missing:
            shown = ", ".join(str(i) for i in self.missing[:20]) + (" ..." if len(self.missing) > 20 else "")
            out.append(f"missing shard(s) {shown}: run the workers that own them")
        return out


def _place(src: Path, dest: Path, link: bool) -> None:
    """Hard-link (same filesystem) or copy `src` to `dest` atomically."""
    tmp = tmp_path_for(dest)
    try:
        if link:
            tmp.unlink()
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
        else:
            shutil.copyfile(src, tmp)
        publish(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def merge_caches(out: Path, sources: list[Path], link: bool = True) -> MergeReport:
    """Join caches written by separate workers into `out` (which may be one of them)."""
    if not sources:
        raise ValueError("--merge needs at least one cache directory")
    out = Path(out)
    check_out_dir(out)
    # Sidecars, not the manifest's list: a worker killed between publishing a
    # shard and refreshing its manifest still has the shard's sidecar.
    manifests = [(Path(d), dataclasses.replace(load_manifest(Path(d)), shards=read_sidecars(Path(d))))
                 for d in sources]
    ref_dir, ref = manifests[0]
    targets = manifests + ([(out, load_manifest(out))] if (out / MANIFEST_NAME).is_file() else [])
    for d, m in targets[1:]:
        diffs = header_differences(ref, m)
        if diffs:
            raise ValueError(f"{d}: cannot merge with {ref_dir}: {'; '.join(diffs)}")
    owner: dict[int, Path] = {}
    for d, m in manifests:
        if d.resolve() == out.resolve():
            continue
        for entry in m.shards:
            if entry.index in owner:
                raise ValueError(f"shard {entry.index} is in both {owner[entry.index]} and {d}")
            owner[entry.index] = d
    out.mkdir(parents=True, exist_ok=True)
    report = MergeReport()
    header = dataclasses.replace(ref, shards=[])
    with file_lock(out / LOCK_NAME):
        write_manifest(out, dataclasses.replace(ref, shards=read_sidecars(out)))
    for d, m in manifests:
        if d.resolve() == out.resolve():
            continue
        for entry in m.shards:
            src = d / entry.file
            if not src.is_file() or src.stat().st_size != entry.bytes or file_sha256(src) != entry.sha256:
                raise ValueError(f"{src}: missing or does not match its manifest entry (sha256); not merged")
            dest = out / entry.file
            if dest.is_file() and dest.stat().st_size == entry.bytes and file_sha256(dest) == entry.sha256:
                report.shards_present += 1
            else:
                if dest.exists() and dest.resolve() != src.resolve():
                    raise ValueError(f"{dest}: a different shard {entry.index} is already there")
                _place(src, dest, link)
                report.shards_added += 1
            write_sidecar(out, entry)
    merged = refresh_manifest(out, header)
    present = {e.index for e in merged.shards}
    report.missing = [i for i in range(int(ref.work.get("num_shards", 0))) if i not in present]
    return report


def _worker_main(argv: list[str]) -> int:
    """Entry point of a per-GPU worker process spawned by `--gpus`."""
    cfg = CacheConfig.from_json(argv[0])
    try:
        run_cache(cfg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
