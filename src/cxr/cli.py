"""The `cxr` command line: each command parses arguments and calls one library function."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Annotated, Any, Callable

import typer
import yaml
from rich.console import Console

from cxr.errors import UserError

app = typer.Typer(help="Chest X-ray classification: ingest, prepare, train, evaluate, tune, serve.", no_args_is_help=True)
console = Console(stderr=True)

Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Dotted override, same names as `dvc exp run -S` (e.g. train.lr=3e-4)."),
]
ParamsFile = Annotated[Path, typer.Option("--params", help="The params file.")]


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A user's mistake ends in one clear message and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def _config(params: Path, overrides: list[str] | None):
    from cxr.config import load_config

    return load_config(params, overrides)


@app.command()
@_user_errors
def config(params: ParamsFile = Path("params.yaml"), overrides: Overrides = None) -> None:
    """Print the resolved configuration (params.yaml plus overrides) as YAML."""
    cfg = _config(params, overrides)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@app.command()
@_user_errors
def ingest(params: ParamsFile = Path("params.yaml"), overrides: Overrides = None) -> None:
    """Materialise the configured data source into paths.raw (images + manifest)."""
    from cxr.data.ingest import ingest as run

    cfg = _config(params, overrides)
    out = run(cfg)
    console.print(f"ingested [bold]{cfg.data.source}[/] into {out}")


@app.command()
@_user_errors
def prepare(params: ParamsFile = Path("params.yaml"), overrides: Overrides = None) -> None:
    """Decode, preprocess and split the raw data into memory-mappable arrays plus a dataset card."""
    from cxr.data.prepare import prepare as run

    cfg = _config(params, overrides)
    card = run(cfg)
    console.print(
        f"prepared {card['n_images']} images ({card['n_rejected']} rejected) into {cfg.paths.prepared}: "
        + json.dumps(card["images_per_split"])
    )


@app.command()
@_user_errors
def train(params: ParamsFile = Path("params.yaml"), overrides: Overrides = None) -> None:
    """Train a model on the prepared data; writes paths.model and an MLflow run."""
    from cxr.train import fit

    cfg = _config(params, overrides)
    result = fit(cfg)
    console.print(
        f"trained {cfg.model.arch}: best val AUROC {result.best_val_auroc:.4f} at epoch {result.best_epoch} "
        f"of {result.epochs_trained}; model in {result.model_dir}" + (f"; MLflow run {result.run_id}" if result.run_id else "")
    )


@app.command()
@_user_errors
def evaluate(
    params: ParamsFile = Path("params.yaml"),
    overrides: Overrides = None,
    model: Annotated[str | None, typer.Option(help="Model directory or MLflow URI (default: paths.model).")] = None,
) -> None:
    """Evaluate the model on val and test: metrics with CIs, subgroups, PNG plots in paths.reports."""
    from cxr.evaluate import evaluate as run

    cfg = _config(params, overrides)
    report = run(cfg, model)
    for split, result in report["splits"].items():
        parts = [f"{k} {result[k]['value']:.4f}" for k in ("auroc", "macro_auroc", "accuracy", "sensitivity", "specificity")
                 if isinstance(result.get(k), dict) and result[k].get("value") is not None]
        console.print(f"{split}: " + ", ".join(parts))


def main() -> None:  # pragma: no cover - console entry point
    app()
