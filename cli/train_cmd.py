"""`vpmoe train CONFIG.yaml [--set k=v ...] [--resume | --resume-from PATH] [--nproc-per-node N]`.

Under torchrun (RANK in the environment) this process is one rank and trains.
With --nproc-per-node N and no torchrun environment it starts N ranks itself
through torch.distributed.run, each running this same command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from cli.main import app
from common.cpu_share import with_cpu_share
from common.parent_death import dies_with_this_process


def split_overrides(sets: list[str] | None, extra: list[str] | None) -> list[str]:
    """`--set a=1 --set b=2`, and also `--set a=1 b=2` (the trailing pairs arrive as arguments)."""
    overrides = list(sets or [])
    for item in extra or []:
        if "=" not in item:
            raise typer.BadParameter(f"unexpected argument {item!r} (overrides are key=value)")
        overrides.append(item)
    return overrides


def relaunch(nproc: int, argv: list[str]) -> int:
    """Runs `python -m cli <argv>` on nproc local ranks under torch.distributed.run; returns its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "cli", *argv]
    env = with_cpu_share(os.environ, nproc)  # each rank's decode threads and torch threads share the cores
    # torchrun's agent dies with this process, and each rank with the agent (cli/__main__.py).
    return subprocess.call(cmd, env=env, preexec_fn=dies_with_this_process())


@app.command("train", context_settings={"allow_interspersed_args": True})
def train(
    config: Path = typer.Argument(..., help="Training config (YAML); see configs/."),
    extra: list[str] = typer.Argument(None, hidden=True),
    sets: list[str] = typer.Option(None, "--set", help="Override a config key: section.key=value (repeatable)."),
    resume_latest: bool = typer.Option(False, "--resume",
                                       help="Resume from the latest checkpoint (or start fresh if there is none)."),
    resume_from: Optional[Path] = typer.Option(None, "--resume-from", help="Resume from this checkpoint."),
    nproc_per_node: int = typer.Option(0, "--nproc-per-node",
                                       help="Start this many local ranks (when not already under torchrun)."),
):
    """Train the student on the teacher cache (FSDP2 over all ranks)."""
    from student_train.config import load_config

    # The trainer takes "" for the latest checkpoint, a path for that one, None for a fresh start.
    resume = str(resume_from) if resume_from is not None else ("" if resume_latest else None)
    # `--resume PATH` arrives as `--resume` plus a trailing argument (the option's value is optional).
    extra = list(extra or [])
    if resume == "" and extra and "=" not in extra[0]:
        resume = extra.pop(0)
    overrides = split_overrides(sets, extra)
    try:
        cfg = load_config(config, overrides)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    if nproc_per_node > 0 and "RANK" not in os.environ:
        argv = ["train", str(config), *[a for o in overrides for a in ("--set", o)]]
        if resume is not None:
            argv += ["--resume-from", resume] if resume else ["--resume"]
        raise typer.Exit(relaunch(nproc_per_node, argv))

    from student_train.trainer import NonFiniteError, run

    try:
        summary = run(cfg, resume)
    except ValueError as exc:  # input the run cannot use: a cache, a checkpoint, the student
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    except NonFiniteError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"done: {summary.steps} steps, {summary.tokens:,} tokens, "
                   f"{summary.tokens_per_s:,.0f} tokens/s; last checkpoint {summary.last_checkpoint}"
                   + (f"; export {summary.export_dir}" if summary.export_dir else ""))
