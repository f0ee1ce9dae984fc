"""`vpmoe cache-teacher`: run the teacher once over a tokenized corpus and write shards."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from cli.main import app


def _parse_list(value: Optional[str], kind: type, option: str) -> tuple | None:
    """A comma-separated option's values; None when not given."""
    if value is None:
        return None
    if value.strip() == "":
        return ()
    try:
        return tuple(kind(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise typer.BadParameter(f"{option} takes a comma-separated list of {kind.__name__}s, got {value!r}") from exc


# Options that override the config: each option's default is None (not given), so a config file's
# value stands unless the option is given; the defaults are the config's (teacher_cache/*.py).
@app.command("cache-teacher")
def cache_teacher(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (configs/cache_*.yaml); options override it."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="section.key=value override (repeatable), e.g. "
                                             "teacher.selection.topk_block=0; applied after the options."),
    model: Optional[str] = typer.Option(None, "--model", help="Teacher: local HF model directory or hub id."),
    data: Optional[Path] = typer.Option(None, "--data", help="save_to_disk directory, Parquet or Arrow file(s)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split of the dataset to cache [train]."),
    out: Optional[Path] = typer.Option(None, "--out", help="Cache directory (created, resumed or merged into)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="vllm | hf | auto (vllm when CUDA and vllm are present)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N [auto]."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto | bf16 | fp16 | fp32 (teacher compute dtype) [auto]."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code."),
    gpu_memory_utilization: Optional[float] = typer.Option(None, "--gpu-memory-utilization",
                                                           help="vLLM memory share [0.8]."),
    enforce_eager: bool = typer.Option(False, "--enforce-eager", help="vLLM: no CUDA graphs or compile."),
    load_format: Optional[str] = typer.Option(None, "--load-format",
                                              help="auto | dummy (random weights from the config: rehearsals, benchmarks)."),
    logits_chunk: Optional[int] = typer.Option(None, "--logits-chunk", help="Positions per lm_head chunk [1024]."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Store the top K logits per position [64]."),
    temperatures: Optional[str] = typer.Option(None, "--temperatures", help="Log-sum-exp stored at each temperature [1,2]."),
    sampled: Optional[int] = typer.Option(None, "--sampled", help="Store N draws at T=1 instead of top-k."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of sampled draws and hidden-position subsets [0]."),
    hidden_layers: Optional[str] = typer.Option(None, "--hidden-layers", help="1-based teacher layers, e.g. 6,12,24."),
    hidden_dtype: Optional[str] = typer.Option(None, "--hidden-dtype", help="bf16 | fp8 (e4m3, per-token scale) [bf16]."),
    hidden_token_fraction: Optional[float] = typer.Option(None, "--hidden-token-fraction",
                                                          help="Fraction of positions whose hidden states are kept [1]."),
    dense_from_last_layer: bool = typer.Option(False, "--dense-from-last-layer",
                                               help=("Also store the teacher's last layer and record its final norm "
                                                     "and lm_head, for `loss.kl_mode: dense` (exact full-vocabulary "
                                                     "KL); needs a local model directory.")),
    rows_per_shard: Optional[int] = typer.Option(None, "--rows-per-shard",
                                                 help=("Rows per shard; 0 (default): the existing cache's, else about 512 MiB "
                                                       "of raw cells per shard (8-256 rows). Smaller shards are written in "
                                                       "parallel and bound host memory (rows finished early wait for their "
                                                       "shard).")),
    max_tokens_per_batch: Optional[int] = typer.Option(None, "--max-tokens-per-batch",
                                                       help="Padded tokens per forward [16384]."),
    limit_rows: Optional[int] = typer.Option(None, "--limit-rows", help="Use only the first N rows of the split."),
    source_column: Optional[str] = typer.Option(None, "--source-column",
                                                help="Column naming each row's source: a string, or a struct whose "
                                                     "'dataset' field is used [source; stored when present]."),
    bad_spans: Optional[str] = typer.Option(None, "--bad-spans",
                                            help="Rows whose spans do not fit their tokens: error | unknown "
                                                 "(a warning, channel 'unknown') [error]."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Workers (nodes) in all; else env."),
    worker_index: Optional[int] = typer.Option(None, "--worker-index", help="This worker's index; else env."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="One worker process per GPU of this node, e.g. 0,1,2,3."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and storage estimate; write nothing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a cache made with other settings."),
    gpu_hour_price: Optional[float] = typer.Option(None, "--gpu-hour-price", help="Price per GPU-hour for the summary."),
    encode_threads: Optional[int] = typer.Option(None, "--encode-threads", help="Threads encoding rows for the writer [2]."),
    compression: Optional[str] = typer.Option(None, "--compression",
                                              help="Shard buffer compression: zstd | lz4 (faster writes) | none [zstd]."),
    zstd_level: Optional[int] = typer.Option(None, "--zstd-level", help="zstd level when --compression zstd [3]."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No live progress bar."),
    merge: bool = typer.Option(False, "--merge", help="Join the caches DIR... (written by separate workers) into --out."),
    merge_dirs: Optional[list[Path]] = typer.Argument(None, metavar="[DIR]...", help="Caches to join with --merge."),
):
    """Cache a teacher's targets (and hidden states) for every row of a tokenized dataset."""
    from teacher_cache.cache_run import CacheConfig, merge_caches, run_cache

    console = Console()
    try:
        if merge:
            if out is None:
                raise ValueError("--out is required")
            for line in merge_caches(out, list(merge_dirs or [])).lines():
                console.print(line, highlight=False, markup=False, soft_wrap=True)
            return
        if merge_dirs:
            raise ValueError(f"unexpected argument(s) {', '.join(map(str, merge_dirs))} (did you mean --merge?)")
        # Switches only turn a setting on (off is the config's default, or its file's value).
        given = dict(model=model, data=None if data is None else str(data), split=split,
                     out=None if out is None else str(out), backend=backend, device=device, dtype=dtype,
                     trust_remote_code=trust_remote_code or None, gpu_memory_utilization=gpu_memory_utilization,
                     enforce_eager=enforce_eager or None, load_format=load_format, logits_chunk=logits_chunk,
                     top_k=top_k, temperatures=_parse_list(temperatures, float, "--temperatures"), sampled=sampled,
                     seed=seed, hidden_layers=_parse_list(hidden_layers, int, "--hidden-layers"),
                     hidden_dtype=hidden_dtype, hidden_token_fraction=hidden_token_fraction,
                     dense_from_last_layer=dense_from_last_layer or None,
                     rows_per_shard=rows_per_shard, max_tokens_per_batch=max_tokens_per_batch, limit_rows=limit_rows,
                     num_workers=num_workers, worker_index=worker_index, gpus=_parse_list(gpus, int, "--gpus"),
                     dry_run=dry_run or None, overwrite=overwrite or None, gpu_hour_price=gpu_hour_price,
                     encode_threads=encode_threads, compression=compression, zstd_level=zstd_level,
                     show_progress=False if no_progress else None, source_column=source_column,
                     bad_spans=bad_spans)
        cfg = CacheConfig.load(config, sets or (), **given)
        if not cfg.out:
            raise ValueError("--out is required")
        if not cfg.teacher.model or not cfg.data.path:
            raise ValueError("--model and --data are required")
        run_cache(cfg, console)
    # OSError: a disk that fills or a directory that turns read-only mid-run (its message names the path).
    except (ValueError, RuntimeError, OSError) as exc:
        Console(stderr=True).print(f"error: {' '.join(str(exc).split())}", highlight=False, markup=False,
                                   soft_wrap=True)
        raise typer.Exit(2)
