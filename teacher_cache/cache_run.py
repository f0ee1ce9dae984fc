"""`cache-teacher` orchestration: check inputs, agree on the cache header,
resume, run the backend through the writer pipeline, and join worker caches.

Order of work: the teacher's config and every selected source row are checked
before anything is written or any model is loaded. An existing cache must have
been made with the same teacher, targets, source and rows per shard (unless
--overwrite); its finished shards are verified (sidecar, size, sha256, row
range) and kept, anything partial is recomputed (`CacheDir.open_for_run`). The
manifest is rebuilt from the sidecars as shards are published, under a lock,
so workers can share a directory. `--gpus` runs this once per GPU in worker
processes (`gpu_workers.py`); `--merge` joins worker caches (`CacheDir.merge_from`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from rich.console import Console

from common.cache_dir import CacheDir, MergeReport
from common.manifest import CacheManifest, ShardEntry
from common.paths import is_within, overlap, overlap_error
from common import config_file
from common.spec import ShardSpec
from common.teacher_head import TeacherHeadRecord, locate_teacher_head
from teacher_cache import spec_config
from teacher_cache.backend import BackendOptions, TeacherInfo, default_backend_name, make_backend, read_teacher_info
from teacher_cache.data import SourceConfig, SourceData, open_source
from teacher_cache.spec_config import HiddenConfig, TargetsConfig
from teacher_cache.gpu_workers import check_gpus, run_gpu_workers
from teacher_cache.pipeline import PipelineConfig, ProgressView, RunSummary, WriterPipeline
from teacher_cache.plan import ShardPlan, WorkerSlot, auto_rows_per_shard, plan_shards, resolve_worker, shards_for_worker
from teacher_cache.plan_report import plan_report, print_lines
from teacher_cache.provenance import software_versions, tokenizer_record

# Seconds between manifest rebuilds while shards are being published (and once at the end).
MANIFEST_REFRESH_S = 30.0


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

    def cache_settings(self) -> dict:
        """What the manifest records: the config without how one invocation ran (its worker share,
        GPUs, dry run, overwrite, price, quiet), so the parent and its per-GPU workers record the same."""
        return {key: value for key, value in self.to_dict().items() if key not in _INVOCATION_KEYS}

    @classmethod
    def from_json(cls, text: str) -> "CacheConfig":
        return config_file.build(cls, json.loads(text), "", "config")


_INVOCATION_KEYS = ("num_workers", "worker_index", "gpus", "dry_run", "overwrite", "gpu_hour_price", "quiet")


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
    source = open_source(cfg.data.path, cfg.data.split, cfg.data.limit_rows, cfg.data.columns)
    source.validate(info.vocab_size, info.max_context)
    spec = dataclasses.replace(build_spec(cfg, info), columns=source.row_columns.names)
    backend = default_backend_name() if cfg.teacher.backend == "auto" else cfg.teacher.backend
    rows_per_shard = resolve_rows_per_shard(cfg, spec, source)
    plan = plan_shards(source.num_rows, rows_per_shard)
    header = CacheManifest(
        spec=spec,
        teacher={"model": cfg.teacher.model, "model_type": info.model_type, "config_hash": info.config_hash,
                 "weights_fingerprint": "dummy" if cfg.teacher.load_format == "dummy" else info.weights_fingerprint,
                 "backend": backend, "dtype": cfg.teacher.dtype},
        tokenizer={"vocab_size": info.vocab_size, **tokenizer_record(cfg.teacher.model)},
        source=source.describe(),
        work={"rows_per_shard": rows_per_shard, "num_rows": source.num_rows, "num_shards": len(plan)},
        config=dataclasses.replace(cfg, rows_per_shard=rows_per_shard).cache_settings(),
        dense_head=dense_head_record(cfg, info),
        software=software_versions(backend),
    )
    return Prepared(info, source, spec, backend, plan, header)


def dense_head_record(cfg: CacheConfig, info: TeacherInfo) -> TeacherHeadRecord | None:
    """Where the teacher's final norm and lm_head live, for `--dense-from-last-layer`."""
    if not cfg.hidden.dense_from_last_layer:
        return None
    if cfg.teacher.load_format == "dummy":
        raise ValueError("--dense-from-last-layer: a --load-format dummy teacher has no weights to rebuild logits from")
    return locate_teacher_head(cfg.teacher.model, info.num_layers, info.vocab_size, info.hidden_size)


def resolve_rows_per_shard(cfg: CacheConfig, spec: ShardSpec, source: SourceData) -> int:
    """`--rows-per-shard`, or for 0 (automatic) the value of the cache already in
    `--out` (so a resume never needs the flag), else about 512 MiB of raw cells per shard."""
    if cfg.rows_per_shard < 0:
        raise ValueError(f"--rows-per-shard must be >= 1 (or 0 for automatic), got {cfg.rows_per_shard}")
    if cfg.rows_per_shard:
        return cfg.rows_per_shard
    if not cfg.overwrite and CacheDir(cfg.out).has_manifest():
        existing = CacheDir(cfg.out).manifest().work.get("rows_per_shard")
        if isinstance(existing, int) and existing > 0:
            return existing
    return auto_rows_per_shard(spec, source.num_tokens / max(source.num_rows, 1))


def _gpus_in_use(cfg: CacheConfig) -> int:
    import torch

    if cfg.gpus:
        return len(cfg.gpus)
    on_gpu = torch.cuda.is_available() and not cfg.teacher.device.startswith("cpu")
    return 1 if on_gpu else 0


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
    check_gpus(cfg.gpus)
    prep = prepare(cfg)
    cfg = dataclasses.replace(cfg, rows_per_shard=prep.header.work["rows_per_shard"])  # automatic size resolved
    worker = resolve_worker(cfg.num_workers, cfg.worker_index)  # with --gpus: this node's slot
    if not cfg.quiet:
        print_lines(console, plan_report(cfg, prep, worker, workers_per_node=max(len(cfg.gpus), 1)))
    if cfg.dry_run:
        print_lines(console, ["dry run: nothing written"])
        return None
    summary = run_gpu_workers(cfg, prep.plan, worker) if cfg.gpus else _run_worker(cfg, prep, worker)
    if not cfg.quiet:
        print_lines(console, summary.lines())
    return summary


def _run_worker(cfg: CacheConfig, prep: Prepared, worker: WorkerSlot) -> RunSummary:
    """This process's shards: those already finished and intact are kept, the rest written."""
    out = CacheDir(cfg.out)
    mine = shards_for_worker(prep.plan, worker)
    # Shards past the end of the plan (an earlier, larger --limit-rows) belong to nobody: worker 0 removes them.
    todo, kept = out.open_for_run(prep.header, mine, num_shards=len(prep.plan), drop_beyond=worker.index == 0,
                                  overwrite=cfg.overwrite)
    summary = RunSummary(shards_skipped=len(kept), num_gpus=_gpus_in_use(cfg), gpu_hour_price=cfg.gpu_hour_price)
    start = time.monotonic()
    if todo:
        _write_shards(cfg, prep, out, todo, summary)  # refreshes the manifest as it goes and at its end
    else:
        out.refresh_manifest(prep.header)
    summary.seconds = time.monotonic() - start
    return summary


def _write_shards(cfg: CacheConfig, prep: Prepared, out: CacheDir, todo: list[ShardPlan], summary: RunSummary) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    progress = ProgressView(sum(s.num_rows for s in todo), enabled=cfg.writer.show_progress and not cfg.quiet)
    pipeline = WriterPipeline(out.path, prep.spec, cfg.writer, progress)
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
                out.refresh_manifest(prep.header)
                last_refresh[0] = time.monotonic()
            summary.shards += 1
            summary.rows += entry.rows
            summary.tokens += entry.tokens
            summary.bytes += entry.bytes

        try:
            # The dataset's row columns join each row here, outside the backends.
            teacher_rows = prep.source.row_columns.annotate_all(backend.run(source_rows))
            pipeline.write_shards(todo, teacher_rows, on_shard=shard_done)
        finally:
            out.refresh_manifest(prep.header)  # every shard finished so far, whatever happened
    finally:
        if backend is not None:
            backend.close()
        pipeline.close()
        progress.close()


def merge_caches(out: Path, sources: list[Path], link: bool = True) -> MergeReport:
    """Join caches written by separate workers into `out` (which may be one of them)."""
    if not sources:
        raise ValueError("--merge needs at least one cache directory")
    check_out_dir(Path(out))
    return CacheDir(out).merge_from([Path(d) for d in sources], link)
