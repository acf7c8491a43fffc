"""The model's own (internal) test metrics, found in its run, registry tags or metadata, and the comparison."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from cxr.evaluation import metrics
from cxr.evaluation.external.answering import EvaluatedModel
from cxr.tracking import runs as tracking
from cxr.tracking.uris import registry_version

if TYPE_CHECKING:
    from cxr.config import Config

log = logging.getLogger(__name__)


# The headline metrics compared with the internal test set (binary; other tasks use their macro metrics).
COMPARED = tuple(k for k in metrics.BINARY_METRICS if not k.startswith("sens_at_spec")) + (
    "macro_auroc",
    "macro_auprc",
    "macro_f1",
)


LOWER_IS_BETTER = {"brier", "ece"}


# A drop above this (in the metric's units, direction-aware) is flagged in the report.
NOTABLE_DROP = 0.05


def training_evaluation(model: EvaluatedModel, cfg: "Config") -> dict[str, Any] | None:
    """evaluation.json of the model's training run (read once: the comparison and the score shift both use it),
    or None where there is no run or it kept none."""
    if not (model.run_id and cfg.mlflow.enabled):
        return None
    tracking.configure(cfg)
    try:
        return tracking.logged_evaluation(model.run_id)
    except ValueError:  # not JSON: as if there were none
        return None


def internal_metrics(model: EvaluatedModel, cfg: "Config", evaluation: dict[str, Any] | None) -> dict[str, Any]:
    """The model's own test-set metrics: the evaluation report of its training run (with CIs), else the
    run's ``test_*`` metrics, else the registered version's tags, else what /metadata carries."""
    found: dict[str, Any] | None = None
    source = None
    if model.run_id and cfg.mlflow.enabled:
        found, source = _from_run(model.run_id, cfg, evaluation)
    if found is None and model.version and cfg.mlflow.enabled:
        entry = registry_version(f"models:/{model.name}/{model.version}")
        tags = entry.tags if entry is not None else {}
        found = {k[5:]: {"value": float(v)} for k, v in tags.items() if k.startswith("test_") and _is_number(v)}
        source = f"registered model {model.name} version {model.version} tags"
    if not found:
        given = model.info.get("metrics") if isinstance(model.info.get("metrics"), dict) else {}
        found = {k[5:]: {"value": float(v)} for k, v in given.items() if k.startswith("test_") and _is_number(v)}
        source = "the service's /metadata"
    if not found:
        return {
            "available": False,
            "reason": "no internal test metrics found (no MLflow run, registry tags or metrics in the model metadata)",
        }
    return {"available": True, "source": source, "metrics": found}


def _is_number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return not isinstance(v, bool)


def _from_run(
    run_id: str, cfg: "Config", evaluation: dict[str, Any] | None
) -> tuple[dict[str, Any] | None, str | None]:
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking.configure(cfg)
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        log.warning(
            "the model's training run %s is not in %s: no internal comparison from it",
            run_id,
            mlflow.get_tracking_uri(),
        )
        return None, None
    test = ((evaluation or {}).get("splits") or {}).get("test")
    if test is not None:
        return (
            {k: v for k, v in test.items() if isinstance(v, dict) and "value" in v},
            f"MLflow run {run_id}: evaluation/evaluation.json (test split)",
        )
    found = {k[5:]: {"value": v} for k, v in run.data.metrics.items() if k.startswith("test_")}
    return (found or None), f"MLflow run {run_id}: test_* metrics"


def compare(internal: dict[str, Any], external: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per metric: internal and external value with CIs, the drop (internal - external, so positive is worse
    except for the calibration errors), whether the CIs overlap, and whether the external result is notably worse."""
    out = {}
    for key in COMPARED:
        ext, inn = external.get(key), internal.get(key)
        if (
            not isinstance(ext, dict)
            or not isinstance(inn, dict)
            or ext.get("value") is None
            or inn.get("value") is None
        ):
            continue
        bounds = (inn.get("ci_low"), inn.get("ci_high"), ext.get("ci_low"), ext.get("ci_high"))
        overlap = None if None in bounds else bool(bounds[0] <= bounds[3] and bounds[2] <= bounds[1])
        drop = inn["value"] - ext["value"]
        out[key] = {
            "internal": inn,
            "external": {k: ext.get(k) for k in ("value", "ci_low", "ci_high")},
            "drop": drop,
            "cis_overlap": overlap,
            "notably_worse": bool((-drop if key in LOWER_IS_BETTER else drop) > NOTABLE_DROP),
        }
    return out
