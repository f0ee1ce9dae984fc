"""`vpmoe autotune CONFIG --seq-len 4096 --target-gbs 256 512`: the largest micro
batch that fits, and grad accumulation per target global batch at this world size."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import typer

from cli.main import app
from cli.train_cmd import relaunch, split_overrides


@app.command("autotune")
def autotune(
    config: Path = typer.Argument(..., help="Training config (YAML)."),
    extra: list[str] = typer.Argument(None, hidden=True),
    seq_len: int = typer.Option(4096, "--seq-len", help="Tokens per sequence to probe at."),
    target_gbs: list[int] = typer.Option(None, "--target-gbs",
                                         help="Global batch sizes (sequences) to plan for: --target-gbs 256 512."),
    sets: list[str] = typer.Option(None, "--set", help="Override a config key: section.key=value (repeatable)."),
    max_micro_batch: int = typer.Option(0, "--max-micro-batch", help="Search cap (default 256 on GPU, 4 on CPU)."),
    nproc_per_node: int = typer.Option(0, "--nproc-per-node", help="Probe on this many local ranks."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    recompute: str = typer.Option("measure", "--recompute",
                                  help="measure: search with activation checkpointing off and on and keep the "
                                       "faster; config: only the config's setting."),
    headroom: float = typer.Option(0.05, "--headroom",
                                   help="Fraction of the GPU's memory a fitting micro batch must leave free at "
                                        "its peak (fragmentation, eval batches); 0 accepts anything that runs."),
):
    """Probe forward/backward/optimizer steps at growing micro batches until one runs out of memory."""
    from student_train.config import load_config

    # `--target-gbs 256 512`: the option takes 256, the 512 arrives as a trailing argument.
    gbs = list(target_gbs or [])
    trailing = []
    for item in extra or []:
        if item.isdigit() and gbs:
            gbs.append(int(item))
        else:
            trailing.append(item)
    overrides = split_overrides(sets, trailing)
    try:
        cfg = load_config(config, overrides)
        if seq_len < 2:
            raise ValueError(f"--seq-len must be >= 2, got {seq_len}")
        if not 0 <= headroom < 1:
            raise ValueError(f"--headroom must be in [0, 1), got {headroom}")
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    if nproc_per_node > 0 and "RANK" not in os.environ:
        argv = ["autotune", str(config), "--seq-len", str(seq_len), "--max-micro-batch", str(max_micro_batch),
                "--recompute", recompute, "--headroom", str(headroom),
                *[a for g in gbs for a in ("--target-gbs", str(g))], *[a for o in overrides for a in ("--set", o)]]
        raise typer.Exit(relaunch(nproc_per_node, argv + (["--json"] if as_json else [])))

    from student_train.autotune import run

    try:
        result = run(cfg, seq_len, gbs, max_micro_batch, recompute, headroom)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        typer.echo(json.dumps(asdict(result)))
        return
    typer.echo(f"largest micro batch at seq_len {result.seq_len} on {result.world_size} x {result.device}: "
               f"{result.max_micro_batch} (activation_checkpointing: {str(result.activation_checkpointing).lower()})")
    for note in result.notes:
        typer.echo(f"note: {note}")
    for plan in result.plans:
        if plan.micro_batch:
            typer.echo(f"global batch {plan.target_gbs}: micro batch {plan.micro_batch} x grad accum "
                       f"{plan.grad_accum} x {result.world_size} ranks"
                       + (f" ({plan.note})" if plan.note else ""))
        else:
            typer.echo(f"global batch {plan.target_gbs}: not reachable ({plan.note})")
