"""`cxr evaluate-external` and the report's tables on the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cxr.cli.app import Overrides, ParamsFile, app, console, load, tables, user_errors


@app.command("evaluate-external")
@user_errors
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

    cfg = load(params, overrides)
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
