"""`vpmoe quickstart OUT`: the whole pipeline on CPU with built-in tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cli.main import app


@app.command("quickstart")
def quickstart(
    out: Path = typer.Argument(..., help="Directory for everything the run writes; a rerun resumes."),
    size: str = typer.Option("default", help="default (a few minutes on 2 cores) or ci (well under a minute)."),
):
    """Run corpus -> teacher -> cache-teacher -> inspect-shard -> train (2 gloo ranks) -> export."""
    from demo.quickstart import run_quickstart

    try:
        summary = run_quickstart(out, size)
    except (ValueError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    print_summary(summary, out)


def print_summary(summary: dict, out: Path) -> None:
    table = Table(title="quickstart summary")
    table.add_column("what")
    table.add_column("value", justify="right")
    data, teacher, train = summary["data"], summary["teacher"], summary["train"]
    table.add_row("train tokens", f"{data['train_tokens']:,}")
    table.add_row("teacher validation CE (nats/token)", f"{teacher['validation_ce']:.3f}")
    table.add_row("teacher training tokens/s", f"{teacher['tokens_per_s']:,.0f}")
    totals = summary["inspect"].get("totals", {})
    if "bytes_per_token" in totals:
        table.add_row("cache bytes/token (all)", f"{totals['bytes_per_token']:.1f}")
        table.add_row("  of which targets / hidden states",
                      f"{totals['target_bytes_per_token']:.1f} / {totals['hidden_bytes_per_token']:.1f}")
    cache_s = summary["cache"]["train"]["seconds"]
    table.add_row("cache-teacher tokens/s (incl. start-up)", f"{data['train_tokens'] / cache_s:,.0f}")
    if train.get("tokens_per_s"):
        table.add_row("student training tokens/s", f"{train['tokens_per_s']:,.0f}")
    for label, record in (("before", train.get("eval_first")), ("after", train.get("eval_last"))):
        if record:
            table.add_row(f"student eval CE {label} (step {record['step']})", f"{record['ce']:.3f}")
            table.add_row(f"student eval KL {label}", f"{record['kl']:.3f}")
    last = train.get("eval_last") or {}
    for group, what in (("by_source", "source"), ("by_channel", "channel")):
        for name, g in (last.get(group) or {}).items():
            table.add_row(f"  eval after, {what} {name} ({g['tokens']:,} tokens)",
                          f"CE {g['ce']:.3f} KL {g['kl']:.3f} top-1 {g['top1']:.3f}")
    table.add_row("export loads with from_pretrained", str(summary["export"]["export_loads"]))
    Console().print(table)
    typer.echo(f"summary: {Path(out) / 'summary.json'}")
    typer.echo(json.dumps({"summary_path": str(Path(out) / "summary.json")}))
