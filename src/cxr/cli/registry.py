"""`cxr` commands for the MLflow registry: register, promote, rollback, models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cxr.cli.app import Overrides, ParamsFile, app, console, load, tables, user_errors


@app.command()
@user_errors
def register(
    run_id: Annotated[
        str | None, typer.Option(help="Training run to register (default: the run behind paths.model).")
    ] = None,
    params: ParamsFile = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Register a trained model as a new version: lineage, the evaluation it came with, a model card."""
    from cxr.tracking import registry  # lazy: a stage pulls in torch/mlflow, `cxr --help` must not

    cfg = load(params, overrides)
    version = registry.register(cfg, run_id)
    tags = version.tags
    console.print(
        f"registered {cfg.mlflow.registered_model} version {version.version} from run {tags.get('run_id')}; "
        + (
            f"val AUROC {tags.get('val_auroc')} (CI {tags.get('val_auroc_ci_low')} to {tags.get('val_auroc_ci_high')}), "
            f"test AUROC {tags.get('test_auroc')} (CI {tags.get('test_auroc_ci_low')} to {tags.get('test_auroc_ci_high')})"
            if tags.get("evaluated") == "true"
            else "not evaluated"
        ),
        highlight=False,
        soft_wrap=True,
    )
    for refusal in registry.candidate_checks(tags):  # say now what `cxr promote` will say
        console.print(
            f"[yellow]warning:[/] the gate will refuse it (rule {refusal.rule}): {refusal.reason}",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
@user_errors
def promote(
    version: Annotated[str, typer.Argument(help="Model version to promote.")],
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Promote even if the gate refuses (needs --reason; both recorded in the history)."
        ),
    ] = False,
    reason: Annotated[str | None, typer.Option(help="Why (kept in the promotion history).")] = None,
    params: ParamsFile = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Move the champion alias to VERSION if it passes the gate: evaluated, not degenerate, beats the champion."""
    from cxr.evaluation.champion import write_champion_summary  # lazy: torch/mlflow, `cxr --help` must not
    from cxr.tracking.registry import promote as run  # lazy: a stage pulls in torch/mlflow, `cxr --help` must not

    cfg = load(params, overrides)
    decision = run(cfg, version, force=force, reason=reason)
    console.print(f"{cfg.mlflow.registered_model}@{cfg.registry.alias} is now version {version}: {decision.reason}")
    console.print(f"its evaluation: {write_champion_summary(cfg)} (`dvc metrics show` lists it)")


@app.command()
@user_errors
def rollback(
    reason: Annotated[str | None, typer.Option(help="Why (kept in the promotion history).")] = None,
    params: ParamsFile = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Return the champion alias to the version that held it before."""
    from cxr.evaluation.champion import write_champion_summary  # lazy: torch/mlflow, `cxr --help` must not
    from cxr.tracking.registry import rollback as run  # lazy: a stage pulls in torch/mlflow, `cxr --help` must not

    cfg = load(params, overrides)
    version = run(cfg, reason=reason)
    console.print(f"{cfg.mlflow.registered_model}@{cfg.registry.alias} is back to version {version.version}")
    console.print(f"its evaluation: {write_champion_summary(cfg)}")


@app.command()
@user_errors
def models(
    history: Annotated[bool, typer.Option("--history", help="Show the promotion history instead.")] = False,
    params: ParamsFile = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """List registered versions with aliases and metrics (or the promotion history)."""
    from cxr.tracking import registry  # lazy: a stage pulls in torch/mlflow, `cxr --help` must not

    cfg = load(params, overrides)
    rows = registry.history(cfg) if history else registry.versions(cfg)
    if not rows:
        console.print(f"no {'promotions' if history else 'versions'} of {cfg.mlflow.registered_model!r} yet")
        return
    table = Table(title=f"{cfg.mlflow.registered_model}: {'promotion history' if history else 'versions'}")
    columns = list(dict.fromkeys(key for row in rows for key in row))  # promote and rollback records differ
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*[_cell(row.get(col)) for col in columns])
    tables().print(table)


def _cell(value: Any) -> str:
    return ", ".join(value) if isinstance(value, list) else ("" if value is None else str(value))
