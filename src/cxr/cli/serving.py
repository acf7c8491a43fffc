"""`cxr serve`: the BentoML service, reported ready once the model answers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cxr.cli.app import ParamsFile, app, console, load, user_errors


@app.command()
@user_errors
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 3000,
    model: Annotated[
        str | None, typer.Option(help="A model directory or MLflow URI (default: models:/NAME@champion).")
    ] = None,
    params: ParamsFile = Path("params.yaml"),
) -> None:
    """`bentoml serve` the champion, after checking that there is a model to serve and the port is free."""
    from cxr.serving import launch  # lazy: a stage pulls in torch/mlflow, `cxr --help` must not

    cfg = load(params, None)
    launch.check_port(host, port)
    ref = launch.check_model(cfg, model)
    console.print(f"starting {ref.name} version {ref.version or '-'} ({ref.uri}) on http://{host}:{port} …")
    env = dict(os.environ) | ({"CXR_PARAMS": str(params.resolve())} if params.exists() else {})
    env |= {"CXR_MODEL_URI": model} if model else {}

    def say_serving(ready: dict) -> None:
        served = ready.get("model", {})
        console.print(f"serving {served.get('name')} version {served.get('version') or '-'} on http://{host}:{port}")

    raise typer.Exit(launch.run_until_stopped(host, port, env, say_serving))
