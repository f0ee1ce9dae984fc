"""`vpmoe` command line: parses arguments and calls into the packages."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Offline teacher-logit distillation: cache a teacher once, train students from the cache.")

# Each command lives in its own module and registers itself on `app`.
from cli import inspect_cmd  # noqa: E402,F401
from cli import quickstart_cmd  # noqa: E402,F401
from cli import cache_cmd  # noqa: E402,F401
from cli import data_cmd  # noqa: E402,F401
from cli import train_cmd  # noqa: E402,F401
from cli import autotune_cmd  # noqa: E402,F401
