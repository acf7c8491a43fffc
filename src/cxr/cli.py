"""The `cxr` command line: each command parses arguments and calls one library function."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

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


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
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


def _config(params: Path, overrides: list[str] | None):
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
    from cxr.data.ingest import ingest as run  # lazy: a stage pulls in torch/mlflow, `cxr --help` must not

    cfg = _config(params, overrides)
    run(cfg)  # says what it ingested


@app.command("synthesize-site")
@_user_errors
def synthesize_site(
    site: Annotated[str, typer.Option(help="Site profile: hospital_b, or internal (the training patients again).")] = (
        "hospital_b"
    ),
    out: Annotated[
        Path | None, typer.Option(help="Output folder: <label>/ sub-folders of DICOM files plus manifest.csv.")
    ] = None,
    patients: Annotated[int | None, typer.Option(help="Patients to generate (default: the site's own count).")] = None,
    seed: Annotated[int | None, typer.Option(help="Generator seed (default: data.synthetic.seed).")] = None,
    params: ParamsFile = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Write a synthetic hospital's labelled films, an external test set for `cxr evaluate-external --data`."""
    from cxr.data.sources.synthetic import write_site  # lazy: numpy/pydicom/scipy, `cxr --help` must not

    cfg = _config(params, overrides)
    out = out or Path("data/external") / site
    manifest = write_site(cfg, site, out, n_patients=patients, seed=seed)
    counts = manifest["label"].value_counts().sort_index()
    console.print(
        f"wrote {len(manifest)} SYNTHETIC films of {manifest['patient_id'].nunique()} patients of site {site} "
        f"into {out} (" + ", ".join(f"{n} {label}" for label, n in counts.items()) + "); "
        f"score a model on it with `cxr evaluate-external --data {out}`"
    )


@app.command()
@_user_errors
def prepare(params: ParamsFile = Path("params.yaml"), overrides: Overrides = None) -> None:
    """Decode, preprocess and split the raw data into memory-mappable arrays plus a dataset card."""
    from cxr.data.prepare import prepare as run  # lazy: a stage pulls in torch/mlflow, `cxr --help` must not

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
    from cxr.training.fit import fit  # lazy: a stage pulls in torch/mlflow, `cxr --help` must not

    cfg = _config(params, overrides)
    result = fit(cfg)
    if not result.main_process:  # under torchrun, rank 0 reports for all
        return
    what = (
        f"{cfg.model.arch}: best val AUROC {result.best_val_auroc:.4f} at epoch {result.best_epoch} of "
        f"{result.epochs_trained}"
        if cfg.train.ensemble == 1
        else f"an ensemble of {cfg.train.ensemble} {cfg.model.arch}: val AUROC {result.best_val_auroc:.4f} "
        f"(best epochs {result.best_epoch}, {result.epochs_trained} epochs in all)"
    )
    console.print(
        f"trained {what}; model in {result.model_dir}" + (f"; MLflow run {result.run_id}" if result.run_id else "")
    )


@app.command()
@_user_errors
def ensemble(
    models: Annotated[
        list[str], typer.Argument(help="Two or more trained models: directories or MLflow URIs (models:/cxr/3).")
    ],
    out: Annotated[Path | None, typer.Option(help="Where the ensemble is saved (default: paths.model).")] = None,
    params: ParamsFile = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Combine models of any architectures and prepared sizes into one, weighted on validation; writes an MLflow run.

    Example: cxr ensemble models/cnn models/mlp models:/cxr/3 --out models/ensemble
    """
    from cxr.models.predictor import read_card  # lazy: pulls in torch, `cxr --help` must not
    from cxr.training.combine import combine  # lazy: a stage pulls in torch/mlflow, `cxr --help` must not

    cfg = _config(params, overrides)
    result = combine(cfg, models, out)
    members = read_card(result.model_dir).training.members or []
    weights = ", ".join(f"{m.arch} {m.image_size}px {m.weight:.2f}" for m in members)
    console.print(
        f"ensemble of {weights} (weights chosen on validation): val AUROC {result.best_val_auroc:.4f}; "
        f"model in {result.model_dir}" + (f"; MLflow run {result.run_id}" if result.run_id else ""),
        highlight=False,
    )


@app.command()
@_user_errors
def evaluate(
    params: ParamsFile = Path("params.yaml"),
    overrides: Overrides = None,
    model: Annotated[str | None, typer.Option(help="Model directory or MLflow URI (default: paths.model).")] = None,
) -> None:
    """Evaluate the model on val and test: metrics with CIs, subgroups, PNG plots in paths.reports."""
    from cxr.evaluation.evaluate import evaluate as run  # lazy: a stage pulls in torch/mlflow, `cxr --help` must not

    cfg = _config(params, overrides)
    report = run(cfg, model)
    for split, result in report["splits"].items():
        parts = [
            f"{k} {result[k]['value']:.4f}"
            for k in ("auroc", "macro_auroc", "accuracy", "sensitivity", "specificity")
            if isinstance(result.get(k), dict) and result[k].get("value") is not None
        ]
        console.print(f"{split}: " + ", ".join(parts))


@app.command()
@_user_errors
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
    cfg = _config(params, overrides)
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


@app.command()
@_user_errors
def export(
    model: Annotated[str | None, typer.Option(help="Model directory or MLflow URI (default: paths.model).")] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write a copy of the model with its graph here (default: a directory gets it inside; "
            "an MLflow URI's copy goes beside paths.model, named after the version)."
        ),
    ] = None,
    params: ParamsFile = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Export the model to ONNX (model.onnx beside model.safetensors, its sha256 in the card), checked against torch."""
    from cxr.tracking.onnx_artifacts import export_model  # lazy: pulls in torch/mlflow, `cxr --help` must not

    cfg = _config(params, overrides)
    path = export_model(cfg, model, out)
    console.print(f"exported {path} (serve it with CXR_RUNTIME=onnx)")


@app.command()
@_user_errors
def register(
    run_id: Annotated[
        str | None, typer.Option(help="Training run to register (default: the run behind paths.model).")
    ] = None,
    params: ParamsFile = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Register a trained model as a new version: lineage, the evaluation it came with, a model card."""
    from cxr.tracking import registry  # lazy: a stage pulls in torch/mlflow, `cxr --help` must not

    cfg = _config(params, overrides)
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
@_user_errors
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

    cfg = _config(params, overrides)
    decision = run(cfg, version, force=force, reason=reason)
    console.print(f"{cfg.mlflow.registered_model}@{cfg.registry.alias} is now version {version}: {decision.reason}")
    console.print(f"its evaluation: {write_champion_summary(cfg)} (`dvc metrics show` lists it)")


@app.command()
@_user_errors
def rollback(
    reason: Annotated[str | None, typer.Option(help="Why (kept in the promotion history).")] = None,
    params: ParamsFile = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Return the champion alias to the version that held it before."""
    from cxr.evaluation.champion import write_champion_summary  # lazy: torch/mlflow, `cxr --help` must not
    from cxr.tracking.registry import rollback as run  # lazy: a stage pulls in torch/mlflow, `cxr --help` must not

    cfg = _config(params, overrides)
    version = run(cfg, reason=reason)
    console.print(f"{cfg.mlflow.registered_model}@{cfg.registry.alias} is back to version {version.version}")
    console.print(f"its evaluation: {write_champion_summary(cfg)}")


@app.command()
@_user_errors
def models(
    history: Annotated[bool, typer.Option("--history", help="Show the promotion history instead.")] = False,
    params: ParamsFile = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """List registered versions with aliases and metrics (or the promotion history)."""
    from cxr.tracking import registry  # lazy: a stage pulls in torch/mlflow, `cxr --help` must not

    cfg = _config(params, overrides)
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


@app.command()
@_user_errors
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

    cfg = _config(params, None)
    launch.check_port(host, port)
    ref = launch.check_model(cfg, model)
    console.print(f"starting {ref.name} version {ref.version or '-'} ({ref.uri}) on http://{host}:{port} …")
    env = dict(os.environ) | ({"CXR_PARAMS": str(params.resolve())} if params.exists() else {})
    env |= {"CXR_MODEL_URI": model} if model else {}

    def say_serving(ready: dict) -> None:
        served = ready.get("model", {})
        console.print(f"serving {served.get('name')} version {served.get('version') or '-'} on http://{host}:{port}")

    raise typer.Exit(launch.run_until_stopped(host, port, env, say_serving))


@app.command("import-weights")
@_user_errors
def import_weights(
    src: Annotated[
        Path | None,
        typer.Argument(help="A TorchXRayVision checkpoint (a pickled DenseNet) or a torchvision state dict."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for NAME.safetensors and NAME.json.")] = Path("models/imported"),
    download: Annotated[
        str | None, typer.Option(help="Fetch TorchXRayVision weights by name instead, e.g. densenet121-res224-all.")
    ] = None,
    arch: Annotated[str, typer.Option(help="The cxr architecture the weights must load into.")] = "densenet121",
    labels: Annotated[str | None, typer.Option(help="Comma-separated output order, if the file does not say.")] = None,
    mean: Annotated[float | None, typer.Option(help="Input mean on [0, 1] (default: the source's convention).")] = None,
    std: Annotated[float | None, typer.Option(help="Input std on [0, 1] (default: the source's convention).")] = None,
) -> None:
    """Convert pretrained weights into safetensors plus a JSON (normalisation, labels) for model.weights=PATH.

    The one command that opens a pickle: only a TorchXRayVision DenseNet's module classes are allowed in it."""
    from cxr.models import import_weights as convert  # lazy: pulls in torch, `cxr --help` must not
    from cxr.models import xrv_download  # lazy: pulls in torch, `cxr --help` must not

    if (src is None) == (download is None):
        raise UserError("give either a checkpoint file SRC or --download NAME")
    if download is not None:
        src = xrv_download.download(download)
        labels = labels or ",".join(xrv_download.labels_of(download))
    assert src is not None
    names = labels.split(",") if labels else None
    done = convert.import_weights(src, out, arch=arch, labels=names, mean=mean, std=std)
    info = done.description
    console.print(
        f"converted {src} ({info.source.kind}) into {done.weights} and {done.info.name} "
        f"({info.arch}, {info.in_channels}-channel input, normalisation {info.norm_mean:g} / {info.norm_std:g}); "
        f"train from it with `cxr train -s model.arch={info.arch} -s model.weights={done.weights}`"
    )


@app.command("evaluate-external")
@_user_errors
def evaluate_external(
    params: ParamsFile = Path("params.yaml"),
    overrides: Overrides = None,
    url: Annotated[str | None, typer.Option(help="The running cxr service, e.g. http://127.0.0.1:3000.")] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Score in-process instead of through a service: models:/NAME@champion or a model directory."),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="A folder (labels = sub-folder names, e.g. NORMAL/PNEUMONIA) or a manifest CSV; "
            "leave out to use the configured source (-s data.source=... -s data.path=...)."
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Output folder: report/ plus the answer cache that lets a run resume.")
    ] = Path("reports/external"),
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 8,
    timeout: Annotated[float, typer.Option(help="Seconds per request.")] = 30.0,
    retries: Annotated[int, typer.Option(help="Retries on connection errors, 5xx and 429 (never on other 4xx).")] = 4,
    calibrate: Annotated[
        str | None,
        typer.Option(
            help="Choose a site threshold on this many images (e.g. 200) or this fraction (e.g. 0.3) of the set, "
            "split by patient, and report both thresholds on the rest only."
        ),
    ] = None,
    target_sensitivity: Annotated[
        float | None, typer.Option(help="With --calibrate: the site threshold reaches this sensitivity instead.")
    ] = None,
    save_site: Annotated[
        str | None,
        typer.Option(
            help="With --calibrate: store the site threshold on the registered version as operating point NAME "
            "(the service answers at it with ?site=NAME)."
        ),
    ] = None,
) -> None:
    """Evaluate the served model on an external test set; report (JSON + HTML) logged to MLflow."""
    from cxr.evaluation.external import evaluate_external  # lazy: pulls in torch/mlflow, `cxr --help` must not

    cfg = _config(params, overrides)
    report = evaluate_external(
        cfg,
        data=data,
        url=url,
        model=model,
        out=out,
        concurrency=concurrency,
        timeout=timeout,
        retries=retries,
        calibrate=calibrate,
        target_sensitivity=target_sensitivity,
        save_site=save_site,
    )
    say_external_report(report, out)


def say_external_report(report: dict[str, Any], out: Path) -> None:
    """The external report on the terminal: requests, the out-of-distribution verdict, metrics, a site threshold."""
    req = report["requests"]
    console.print(
        f"{req['ok']} of {report['data']['n_images']} images scored ({req['sent']} sent, "
        f"{req['from_cache']} from cache)"
    )
    if req["refused"] or req["failed"]:
        console.print(
            f"[yellow]{req['refused']} refused and {req['failed']} failed, listed in the report"
            + ("; run again to re-send the failed ones" if req["failed"] else ""),
            highlight=False,
        )
    ood = report.get("out_of_distribution", {})
    colour = {"not_built_for": "red", "notable": "yellow"}.get(ood.get("level"), "")
    console.print(f"[bold {colour}]out of distribution:[/] {ood.get('verdict', 'not reported')}", highlight=False)
    tables().print(external_table(report))
    if report.get("site_calibration_skipped"):
        console.print(f"[yellow]no site threshold:[/] {report['site_calibration_skipped']}", highlight=False)
    if report.get("site_calibration"):
        tables().print(site_table(report["site_calibration"]))
        if report["site_calibration"]["saved_as"]:
            console.print(f"saved as {report['site_calibration']['saved_as']} on version {report['model']['version']}")
    console.print(
        f"report: {out / 'report' / 'external.html'}"
        + (f"; MLflow run {report['mlflow_run_id']}" if report.get("mlflow_run_id") else "")
    )


SUMMARY_METRICS = ("auroc", "macro_auroc", "accuracy", "sensitivity", "specificity")


def _with_ci(metric: Any) -> str:
    if not isinstance(metric, dict) or metric.get("value") is None:
        return "-"
    low, high = metric.get("ci_low"), metric.get("ci_high")
    return f"{metric['value']:.3f}" + (f" [{low:.3f}, {high:.3f}]" if None not in (low, high) else "")


def external_table(report: dict[str, Any]) -> Table:
    """Internal test vs external metrics with their CIs and the drop, for the model that answered."""
    model, compared = report["model"], report["comparison"].get("metrics", {})
    who = f"{model.get('name', 'model')} version {model['version']}" if model.get("version") else "the model"
    inside = (report.get("out_of_distribution") or {}).get("in_distribution_metrics") or {}
    table = Table(title=f"{who} at its threshold: internal test vs external [bootstrap CI]")
    for column in ("metric", "internal test", "external, all films", "external, in distribution", "drop (all)"):
        table.add_column(column)
    for key in SUMMARY_METRICS:
        row = compared.get(key, {"external": report["metrics"].get(key)})
        if _with_ci(row.get("external")) == "-":
            continue
        drop = row.get("drop")
        table.add_row(
            key,
            _with_ci(row.get("internal")),
            _with_ci(row["external"]),
            _with_ci(inside.get(key)),
            "-" if drop is None else f"{drop:+.3f}",
        )
    return table


def site_table(part: dict[str, Any]) -> Table:
    """The model's and the site's operating point on the evaluation part of the external set."""
    t = part["thresholds"]
    n = part["split"]["evaluation"]["in_distribution"]
    table = Table(
        title=f"operating points on the {n} evaluation images in distribution (the site threshold was chosen on others)"
    )
    for column in ("metric", f"model threshold {t['model']:.4f}", f"site threshold {t['site']:.4f}"):
        table.add_column(column)
    points = part["operating_points"]
    for key in ("sensitivity", "specificity", "accuracy", "ppv", "npv"):
        table.add_row(key, _with_ci(points["model"].get(key)), _with_ci(points["site"].get(key)))
    return table


def main() -> None:  # pragma: no cover - console entry point
    app()
