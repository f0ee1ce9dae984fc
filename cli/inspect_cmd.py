"""`vpmoe inspect-shard PATH`: what a shard or cache holds, and whether it is sound.

Exit codes: 0 fine; 1 verification found problems; 2 the input cannot be read
as the format says (one line on stderr naming the file, and row where known).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cli.main import app
from common.targets import target_kind

EXIT_PROBLEMS = 1
EXIT_BAD_INPUT = 2


@app.command("inspect-shard")
def inspect_shard(
    path: Path = typer.Argument(..., help="A shard file (shard-NNNNN.arrow) or a cache directory."),
    verify: bool = typer.Option(False, "--verify",
                                help="Check checksums, content hashes, row ranges and every row's values."),
    row: int | None = typer.Option(None, "--row", help="Show row N (0-based, shards in index order) with its targets."),
    dataset_id: str | None = typer.Option(None, "--id", help="Show the row whose dataset id is ID (caches that store ids)."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="tokenizer.json (or its directory) to decode tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    stats_rows: int = typer.Option(256, "--stats-rows", help="Rows used for distribution statistics."),
    top: int = typer.Option(5, "--top", help="Targets shown per position with --row (human output)."),
    max_positions: int = typer.Option(64, "--max-positions", help="Positions shown with --row (human output)."),
):
    """Schema, sizes per column and token, manifest metadata, teacher statistics; --verify checks integrity."""
    from common.inspect import InspectOptions, inspect_path, load_token_decoder

    try:
        decode_token = load_token_decoder(tokenizer) if tokenizer is not None else None
        report = inspect_path(path, InspectOptions(verify=verify, row=row, dataset_id=dataset_id,
                                                     stats_rows=stats_rows), decode_token)
    except ValueError as exc:  # ShardFormatError included
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    if as_json:
        typer.echo(json.dumps(report))
    else:
        print_report(report, top=top, max_positions=max_positions)
    if verify and not report["verify"]["ok"]:
        raise typer.Exit(EXIT_PROBLEMS)


def print_report(report: dict, top: int, max_positions: int) -> None:
    console = Console()
    spec = report["spec"]
    totals = report["totals"]
    targets = spec["targets"]
    mode = target_kind(targets["mode"]).describe_recorded(targets)
    hidden = spec["hidden"]
    overview = _kv_table(f"{report['kind']}: {report['path']}", {
        "format version": report["format_version"],
        "row checksums": ("CRC-32 of every cell, checked as rows are read" if report["row_checksums"]
                          else "none (format 1): a changed byte inside a shard is not detected"),
        "vocab size": spec["vocab_size"],
        "targets": mode,
        "hidden": (f"layers {hidden['layers']}, {hidden['dtype']}, fraction {hidden['token_fraction']}, "
                   f"D={hidden['hidden_size']}") if hidden["layers"] else "none",
        "dense targets": (f"from hidden layer {report['dense_head']['layer']} through "
                          f"{report['dense_head']['norm']['tensor']} and {report['dense_head']['lm_head']['tensor']} "
                          f"{report['dense_head']['lm_head']['shape']} of {report['dense_head']['model_dir']} "
                          f"(sha256 {report['dense_head']['fingerprint'][:16]}...)")
                         if "dense_head" in report else "none",
        "shards": len(report["shards"]),
        "rows": f"{totals['rows']:,}",
        "tokens": f"{totals['tokens']:,}",
        "file bytes": f"{totals['file_bytes']:,}",
        "bytes/token (file)": f"{totals['bytes_per_token']:.1f}",
        "bytes/token (targets)": f"{totals['target_bytes_per_token']:.1f}",
        "bytes/token (hidden)": f"{totals['hidden_bytes_per_token']:.1f}",
        "bytes/token (row columns)": f"{totals['row_column_bytes_per_token']:.3f}",
    })
    console.print(overview)
    if "manifest" in report:
        flat = {f"{section}.{key}": value for section, values in report["manifest"].items()
                for key, value in (values or {}).items()}
        console.print(_kv_table("manifest", flat))

    columns = Table(title="columns (stored = zstd buffers as in the file)")
    for name, justify in (("column", "left"), ("arrow type", "left"), ("stored", "right"),
                          ("uncompressed", "right"), ("ratio", "right"), ("stored B/token", "right")):
        columns.add_column(name, justify=justify)
    types = {f["name"]: f["type"] for f in report["schema"]}
    for c in report["columns"]:
        columns.add_row(c["name"], types[c["name"]], f"{c['compressed_bytes']:,}", f"{c['uncompressed_bytes']:,}",
                        f"{c['ratio']:.2f}", f"{c['compressed_per_token']:.2f}")
    columns.add_row("(schema, footer, batch metadata)", "", f"{totals['overhead_bytes']:,}", "", "", "")
    console.print(columns)

    if len(report["shards"]) > 1:
        shards = Table(title="shards")
        for name in ("file", "rows", "tokens", "bytes", "batches"):
            shards.add_column(name, justify="left" if name == "file" else "right")
        for s in report["shards"]:
            shards.add_row(s["file"], f"{s['rows']:,}", f"{s['tokens']:,}", f"{s['bytes']:,}", str(s["batches"]))
        console.print(shards)

    console.print(_stats_table(report["stats"]))
    if "row" in report:
        console.print(_row_table(report["row"], spec, top, max_positions))
    if "verify" in report:
        v = report["verify"]
        if v["ok"]:
            console.print(f"[green]verify: OK[/green] ({v['rows_checked']:,} rows checked)")
        else:
            console.print(f"[red]verify: {v['num_problems']} problem(s)[/red]")
            for problem in v["problems"]:
                console.print(problem, markup=False, soft_wrap=True)


def _kv_table(title: str, values: dict) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("key")
    table.add_column("value")
    for key, value in values.items():
        table.add_row(key, value if isinstance(value, str) else json.dumps(value))
    return table


def _stats_table(stats: dict) -> Table:
    table = Table(title=f"teacher statistics ({stats['rows']} rows, T={stats['temperature']}; "
                        "entropy bounds in nats from top-k + tail)")
    for name in ("per position", "mean", "p05", "p50", "p95"):
        table.add_column(name, justify="left" if name == "per position" else "right")
    for name, value in stats.items():
        if isinstance(value, dict) and "mean" in value:
            table.add_row(name, *(f"{value[k]:.4g}" for k in ("mean", "p05", "p50", "p95")))
        elif name.endswith("_fraction") and value is not None:
            table.add_row(name, f"{value:.4f}", "", "", "")
    for layer, h in stats.get("hidden", {}).items():
        if "mean" in h["norm"]:
            table.add_row(f"hidden_{layer} L2 norm (max |x| {h['max_abs']:.4g})",
                          *(f"{h['norm'][k]:.4g}" for k in ("mean", "p05", "p50", "p95")))
    return table


def _row_table(row: dict, spec: dict, top: int, max_positions: int) -> Table:
    tokens = row.get("tokens")
    shown = row["positions"][:max_positions]
    provenance = "".join(f", {name} {row[key]!r}" for key, name in (("dataset_id", "dataset id"), ("source", "source"))
                         if key in row)
    if "channel_counts" in row:
        provenance += ", channels " + " ".join(f"{name} {n}" for name, n in row["channel_counts"].items() if n)
    title = (f"row {row['index']} ({row['shard']}, row_id {row['row_id']}{provenance}, {row['num_tokens']} tokens; "
             f"position t's targets describe token t+1; showing {len(shown)} positions)")
    table = Table(title=title)
    for name in ("t", "token t", "token t+1", "label t+1", "top targets"):
        table.add_column(name, justify="right" if name == "t" else "left")
    kind = target_kind(spec["targets"]["mode"])
    quote = repr if tokens else str
    for p in shown:
        t = p["t"]
        current = quote(tokens[t]) if tokens else str(row["input_ids"][t])
        following = quote(tokens[t + 1]) if tokens else str(p["next_token"])
        names = [quote(n) for n in p["id_tokens"]] if tokens else [str(i) for i in p["ids"]]
        shares = kind.position_shares(p, spec["targets"], top)
        table.add_row(str(t), current, following, str(p["next_label"]),
                      ", ".join(f"{n} {share}" for n, share in zip(names, shares)))
    return table
