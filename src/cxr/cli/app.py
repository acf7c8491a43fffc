"""The `cxr` Typer app and what every command shares: options, the config it loads, one-line user errors."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cxr import logs
from cxr.config import load_config
from cxr.errors import UserError

app = typer.Typer(
    help="Chest X-ray classification: ingest, prepare, train, evaluate, tune, serve.", no_args_is_help=True
)


console = Console(stderr=True, soft_wrap=True)  # one message, one line, in logs too


_verbose = False


@app.callback()
def _options(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show libraries' log lines and logger names (or CXR_VERBOSE=1).")
    ] = False,
) -> None:
    global _verbose
    _verbose = verbose


Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Dotted override, same names as `dvc exp run -S` (e.g. train.lr=3e-4)."),
]


ParamsFile = Annotated[Path, typer.Option("--params", help="The params file.")]


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A user's mistake ends in one clear message and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logs.setup(_verbose)
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            if os.environ.get("RANK", "0") == "0":  # under torchrun every process refuses alike: one says so
                console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def tables() -> Console:
    """Standard output for tables; piped, it is not squeezed into 80 columns."""
    out = Console()
    return out if out.is_terminal else Console(width=200)


def load(params: Path, overrides: list[str] | None):
    return load_config(params, overrides)
