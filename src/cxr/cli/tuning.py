"""`cxr tune`: the Optuna study over the training function."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cxr.cli.app import Overrides, ParamsFile, app, console, load, user_errors


@app.command()
@user_errors
def tune(
    trials: Annotated[
        int, typer.Option("--trials", "-n", help="Finished (complete or pruned) trials wanted in the study.")
    ] = 20,
    timeout: Annotated[float | None, typer.Option(help="Stop starting new trials after this many seconds.")] = None,
    study: Annotated[str | None, typer.Option(help="Study name (default: tune.study).")] = None,
    storage: Annotated[
        str | None, typer.Option(help="Optuna storage URL, e.g. postgresql://user@host/db (default: tune.storage).")
    ] = None,
    register: Annotated[bool, typer.Option("--register", help="Evaluate and register the best trial's model.")] = False,
    params: ParamsFile = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Search hyperparameters (tune.space) with Optuna; every trial is an MLflow child run. Re-run to resume."""
    from cxr.training.distributed import refuse_under_torchrun  # lazy: pulls in torch, `cxr --help` must not
    from cxr.tuning.study import tune as run  # lazy: a stage pulls in torch/mlflow, `cxr --help` must not

    refuse_under_torchrun("tune")
    cfg = load(params, overrides)
    try:
        result = run(cfg, trials, timeout=timeout, study_name=study, storage_url=storage, register=register)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted:[/] finished trials are kept; run the same command to resume")
        raise typer.Exit(130) from None
    console.print(
        f"study {result.study}: {result.n_complete} complete, {result.n_pruned} pruned, {result.n_failed} failed"
    )
    if result.best_value is not None:
        console.print(f"best {cfg.tune.objective} {result.best_value:.4f} with {json.dumps(result.best_params)}")
        console.print(f"best params in {result.best_params_file} (use with `-s` or `dvc exp run -S`)")
    if result.registered_version:
        console.print(
            f"registered version {result.registered_version}; promote it with `cxr promote {result.registered_version}`"
        )
