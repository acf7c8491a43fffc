"""evaluate_external: the command that scores, reports, logs and (with --calibrate) saves a site threshold."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr.errors import UserError
from cxr.evaluation import site
from cxr.evaluation.external.answering import IN_PROCESS, EvaluatedModel, load_in_process
from cxr.evaluation.external.mlflow_log import log_to_mlflow
from cxr.evaluation.external.privacy import FileIds
from cxr.evaluation.external.report import REPORT_DIR, build_report, predictions_table, write_report
from cxr.evaluation.external.scoring import Scored, score_local, score_remote
from cxr.evaluation.external.sections import SiteRequest
from cxr.evaluation.external_data import ExternalSet, load_external_set
from cxr.evaluation.response_cache import ResponseCache
from cxr.fsutil import atomic_dir
from cxr.serving.client import ServiceClient
from cxr.tracking import runs as tracking
from cxr.tracking.registry import check_site_name, record_external_ood, save_operating_point

if TYPE_CHECKING:
    import httpx

    from cxr.config import Config

log = logging.getLogger(__name__)


CACHE_FILE = "responses.jsonl"


def evaluate_external(
    cfg: "Config",
    *,
    data: str | Path | None = None,
    url: str | None = None,
    model: str | Path | None = None,
    out: str | Path = "reports/external",
    concurrency: int = 8,
    timeout: float = 30.0,
    retries: int = 4,
    backoff: float = 0.5,
    transport: "httpx.AsyncBaseTransport | None" = None,
    calibrate: str | float | None = None,
    target_sensitivity: float | None = None,
    save_site: str | None = None,
) -> dict[str, Any]:
    """Score the external set through the service at ``url`` (or in-process with ``model``) and report.

    With ``calibrate`` (a count of images or a fraction), that part of the set chooses a site threshold
    (the model's rule, or ``target_sensitivity``) and the report judges both thresholds on the rest;
    ``save_site`` then stores it on the registered version as the operating point of that name."""
    size = _check_site_options(calibrate, target_sensitivity, save_site)
    _check_request(url, model, concurrency, retries, timeout)
    out = Path(out)
    client_kwargs = {"url": url, "timeout": timeout, "retries": retries, "backoff": backoff, "transport": transport}
    evaluated, endpoint, score = _scorer(cfg, model, client_kwargs, concurrency)
    if size is not None:
        _check_model_for_site(evaluated, save_site, cfg)
    ext = load_external_set(cfg, data, evaluated.task, out / "source")
    log.info("external set: %d images (%s), dataset hash %s", len(ext.table), ext.description, ext.dataset_hash[:12])
    calibration = None
    if size is not None:
        rule = site.site_rule(evaluated.info, target_sensitivity, cfg.evaluate.target_sensitivity)
        calibration = SiteRequest(site.split_for_calibration(ext.table, size, cfg.project.seed), rule, size, save_site)
    scored = score(ext, ResponseCache(out / CACHE_FILE))
    with atomic_dir(out / REPORT_DIR) as tmp:  # the report appears whole or not at all
        report = build_report(ext, evaluated, scored, cfg, endpoint, tmp / "plots", calibration)
        if calibration is not None and calibration.save_as and "site_calibration" in report:
            _save_site(cfg, report, evaluated, calibration.save_as, ext)
        ids = FileIds()
        predictions = predictions_table(ext, evaluated, scored.answers, ids)
        write_report(report, predictions, tmp)
    report["mlflow_run_id"] = log_to_mlflow(cfg, report, predictions, out / REPORT_DIR, ext, evaluated, ids)
    _record_ood(cfg, report["out_of_distribution"], evaluated, ext)
    return report


def _check_request(url: str | None, model: str | Path | None, concurrency: int, retries: int, timeout: float) -> None:
    if (url is None) == (model is None):
        raise UserError(
            "give either --url (a running cxr service) or --model (models:/NAME@champion or a model "
            "directory, scored in-process)"
        )
    if concurrency < 1 or retries < 0 or timeout <= 0:
        raise UserError("--concurrency must be >= 1, --retries >= 0 and --timeout > 0")


def _scorer(
    cfg: "Config", model: str | Path | None, client_kwargs: dict[str, Any], concurrency: int
) -> tuple[EvaluatedModel, str, Callable[[ExternalSet, ResponseCache], Scored]]:
    """Who answers (the service at ``client_kwargs["url"]``, or ``model`` in process), the endpoint the report
    names, and the function that scores a set with it."""
    url = client_kwargs["url"]
    if url is not None:
        evaluated = EvaluatedModel.from_metadata(asyncio.run(_metadata(client_kwargs)))
        return (
            evaluated,
            f"{url.rstrip('/')}/predict",
            lambda ext, cache: score_remote(ext, evaluated, cache, client_kwargs, concurrency),
        )
    if cfg.mlflow.enabled:
        tracking.configure(cfg)  # models:/ URIs resolve in the configured store
    in_process = load_in_process(model, cfg)
    evaluated = EvaluatedModel.from_metadata(in_process.metadata())
    return evaluated, IN_PROCESS, lambda ext, cache: score_local(ext, evaluated, in_process, cache)


def _record_ood(cfg: "Config", ood: dict[str, Any], model: EvaluatedModel, ext: ExternalSet) -> None:
    """The share flagged, on the registered version (best effort: the version may live in another registry)."""
    if not ood.get("checked") or model.version is None or not cfg.mlflow.enabled:
        return
    try:
        record_external_ood(cfg, str(model.name), str(model.version), ext.dataset_hash, ood["share"])
    except Exception as exc:  # a service whose registry is not this store's
        what = type(exc).__name__
        log.warning(
            "the out-of-distribution share was not recorded on %s version %s: %s", model.name, model.version, what
        )


def _check_site_options(
    calibrate: str | float | None, target_sensitivity: float | None, save_site: str | None
) -> int | float | None:
    """The calibration size, or None without --calibrate (whose companions then make no sense)."""
    if calibrate is None:
        if target_sensitivity is not None or save_site is not None:
            raise UserError("--target-sensitivity and --save-site need --calibrate N (the images that choose it)")
        return None
    if save_site is not None:
        check_site_name(save_site)
    return site.parse_size(calibrate)


def _check_model_for_site(model: EvaluatedModel, save_site: str | None, cfg: "Config") -> None:
    if not model.task.binary:
        raise site.CalibrationError(f"--calibrate chooses one threshold: it needs a binary model, not {model.task}")
    if save_site is not None and (model.version is None or not cfg.mlflow.enabled):
        raise UserError(
            f"--save-site stores the threshold on a registered model version, and {model.uri or 'this model'} is "
            "not one; evaluate models:/NAME@ALIAS (or a service serving one) with mlflow.enabled"
        )


def _save_site(cfg: "Config", report: dict[str, Any], model: EvaluatedModel, name: str, ext: ExternalSet) -> None:
    part = report["site_calibration"]
    n_calibration = part["split"]["calibration"]["in_distribution"]
    point = site.operating_point_tag(part["thresholds"]["site"], part["rule"], n_calibration, ext.dataset_hash)
    part["saved_as"] = save_operating_point(cfg, str(model.name), str(model.version), name, point)
    log.info("saved the site threshold as %s on %s version %s", part["saved_as"], model.name, model.version)


async def _metadata(client_kwargs: dict[str, Any]) -> dict[str, Any]:
    async with ServiceClient(**client_kwargs) as client:
        return await client.metadata()
