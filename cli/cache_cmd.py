"""`vpmoe cache-teacher`: run the teacher once over a tokenized corpus and write shards."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from cli.main import app


def _parse_list(value: Optional[str], kind: type, option: str) -> tuple:
    if value is None or value.strip() == "":
        return ()
    try:
        return tuple(kind(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise typer.BadParameter(f"{option} takes a comma-separated list of {kind.__name__}s, got {value!r}") from exc


@app.command("cache-teacher")
def cache_teacher(
    model: Optional[str] = typer.Option(None, "--model", help="Teacher: local HF model directory or hub id."),
    data: Optional[Path] = typer.Option(None, "--data", help="save_to_disk directory, Parquet or Arrow file(s)."),
    split: str = typer.Option("train", "--split", help="Split of the dataset to cache."),
    out: Optional[Path] = typer.Option(None, "--out", help="Cache directory (created, resumed or merged into)."),
    backend: str = typer.Option("auto", "--backend", help="vllm | hf | auto (vllm when CUDA and vllm are present)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | bf16 | fp16 | fp32 (teacher compute dtype)."),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="vLLM tensor parallelism."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code."),
    gpu_memory_utilization: float = typer.Option(0.8, "--gpu-memory-utilization", help="vLLM memory share."),
    enforce_eager: bool = typer.Option(False, "--enforce-eager", help="vLLM: no CUDA graphs or compile."),
    load_format: str = typer.Option("auto", "--load-format",
                                    help="auto | dummy (random weights from the config: rehearsals, benchmarks)."),
    logits_chunk: int = typer.Option(1024, "--logits-chunk", help="Positions per lm_head chunk."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Store the top K logits per position (default 64)."),
    temperatures: str = typer.Option("1,2", "--temperatures", help="Log-sum-exp stored at each temperature."),
    sampled: Optional[int] = typer.Option(None, "--sampled", help="Store N draws at T=1 instead of top-k."),
    seed: int = typer.Option(0, "--seed", help="Seed of sampled draws and hidden-position subsets."),
    hidden_layers: Optional[str] = typer.Option(None, "--hidden-layers", help="1-based teacher layers, e.g. 6,12,24."),
    hidden_dtype: str = typer.Option("bf16", "--hidden-dtype", help="bf16 | fp8 (e4m3, per-token scale)."),
    hidden_token_fraction: float = typer.Option(1.0, "--hidden-token-fraction",
                                                help="Fraction of positions whose hidden states are kept."),
    rows_per_shard: int = typer.Option(0, "--rows-per-shard",
                                       help=("Rows per shard; 0 (default): the existing cache's, else about 512 MiB of raw "
                                             "cells per shard (8-256 rows). Smaller shards are written in parallel and bound "
                                             "host memory (rows finished early wait for their shard).")),
    max_tokens_per_batch: int = typer.Option(16384, "--max-tokens-per-batch", help="Padded tokens per forward."),
    limit_rows: Optional[int] = typer.Option(None, "--limit-rows", help="Use only the first N rows of the split."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Workers (nodes) in all; else env."),
    worker_index: Optional[int] = typer.Option(None, "--worker-index", help="This worker's index; else env."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="One worker process per GPU of this node, e.g. 0,1,2,3."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and storage estimate; write nothing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a cache made with other settings."),
    gpu_hour_price: Optional[float] = typer.Option(None, "--gpu-hour-price", help="Price per GPU-hour for the summary."),
    encode_threads: int = typer.Option(2, "--encode-threads", help="Threads encoding rows for the writer."),
    compression: str = typer.Option("zstd", "--compression",
                                    help="Shard buffer compression: zstd | lz4 (faster writes) | none."),
    zstd_level: int = typer.Option(3, "--zstd-level", help="zstd level when --compression zstd."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No live progress bar."),
    merge: bool = typer.Option(False, "--merge", help="Join the caches DIR... (written by separate workers) into --out."),
    merge_dirs: Optional[list[Path]] = typer.Argument(None, metavar="[DIR]...", help="Caches to join with --merge."),
):
    """Cache a teacher's targets (and hidden states) for every row of a tokenized dataset."""
    from teacher_cache.cache_run import CacheConfig, merge_caches, run_cache

    console = Console()
    try:
        if out is None:
            raise ValueError("--out is required")
        if merge:
            for line in merge_caches(out, list(merge_dirs or [])).lines():
                console.print(line, highlight=False, markup=False, soft_wrap=True)
            return
        if merge_dirs:
            raise ValueError(f"unexpected argument(s) {', '.join(map(str, merge_dirs))} (did you mean --merge?)")
        if model is None or data is None:
            raise ValueError("--model and --data are required")
        cfg = CacheConfig(
            model=model, data=str(data), out=str(out), split=split, backend=backend, device=device, dtype=dtype,
            tensor_parallel_size=tensor_parallel_size, trust_remote_code=trust_remote_code,
            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager, load_format=load_format,
            logits_chunk=logits_chunk,
            top_k=top_k, temperatures=_parse_list(temperatures, float, "--temperatures"), sampled=sampled, seed=seed,
            hidden_layers=_parse_list(hidden_layers, int, "--hidden-layers"), hidden_dtype=hidden_dtype,
            hidden_token_fraction=hidden_token_fraction, rows_per_shard=rows_per_shard,
            max_tokens_per_batch=max_tokens_per_batch, limit_rows=limit_rows, num_workers=num_workers,
            worker_index=worker_index, gpus=_parse_list(gpus, int, "--gpus"), dry_run=dry_run, overwrite=overwrite,
            gpu_hour_price=gpu_hour_price, encode_threads=encode_threads, compression=compression,
            zstd_level=zstd_level, show_progress=not no_progress,
        )
        run_cache(cfg, console)
    # OSError: a disk that fills or a directory that turns read-only mid-run (its message names the path).
    except (ValueError, RuntimeError, OSError) as exc:
        Console(stderr=True).print(f"error: {' '.join(str(exc).split())}", highlight=False, markup=False,
                                   soft_wrap=True)
        raise typer.Exit(2)
