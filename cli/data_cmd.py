"""`vpmoe download-data`: fetch a dataset snapshot from the Hugging Face Hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from cli.main import app


def download_snapshot(repo_id: str, out: Path, revision: str | None = None, repo_type: str = "dataset") -> Path:
    """snapshot_download into `out`; ValueError with a one-line reason when the hub
    cannot be reached or the repository/revision does not exist."""
    import huggingface_hub
    from huggingface_hub import errors

    try:
        path = huggingface_hub.snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_dir=out)
    # The hub's errors all derive from OSError: most specific first.
    except errors.RepositoryNotFoundError as exc:  # includes gated repositories
        raise ValueError(f"{repo_type} {repo_id} not found on the Hugging Face Hub or not accessible "
                         f"(private or gated: log in with `hf auth login`): {_first_line(exc)}") from exc
    except errors.RevisionNotFoundError as exc:
        raise ValueError(f"{repo_type} {repo_id} has no revision {revision!r}") from exc
    except errors.HfHubHTTPError as exc:
        raise ValueError(f"download of {repo_type} {repo_id} failed: {_first_line(exc)}") from exc
    except (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError, ConnectionError, TimeoutError) as exc:
        raise _unreachable(repo_id, repo_type, exc) from exc
    except Exception as exc:
        # httpx transport errors (no connection, DNS, proxy) share no base class with the above.
        if type(exc).__module__.split(".")[0] in ("httpx", "httpcore"):
            raise _unreachable(repo_id, repo_type, exc) from exc
        raise
    return Path(path)


def _unreachable(repo_id: str, repo_type: str, exc: BaseException) -> ValueError:
    return ValueError(f"cannot reach the Hugging Face Hub to download {repo_type} {repo_id} (offline?): "
                      f"{_first_line(exc)}. Copy the dataset directory to this machine and pass it to --data instead")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe_download(path: Path) -> str:
    dataset_dict = path / "dataset_dict.json"
    if dataset_dict.is_file():
        splits = json.loads(dataset_dict.read_text()).get("splits", [])
        return f"save_to_disk dataset with splits {', '.join(splits)}: use --data {path} --split <split>"
    return f"use --data {path}"


@app.command("download-data")
def download_data(
    repo_id: str = typer.Argument(..., help="Hub repository, e.g. veerpareek/vpmoe-phase1-mix-4k-665m."),
    out: Path = typer.Option(..., "--out", help="Directory to download into."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit."),
    repo_type: str = typer.Option("dataset", "--repo-type", help="dataset | model."),
):
    """Download a tokenized dataset snapshot for `cache-teacher --data`."""
    try:
        path = download_snapshot(repo_id, out, revision, repo_type)
    except ValueError as exc:
        Console(stderr=True).print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(2)
    Console().print(f"downloaded {repo_id} to {path}; {describe_download(path)}", highlight=False, markup=False, soft_wrap=True)
