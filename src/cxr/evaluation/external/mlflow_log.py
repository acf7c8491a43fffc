"""The external evaluation as an MLflow run beside the served model version."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from cxr.evaluation import metrics
from cxr.evaluation.external.answering import EvaluatedModel
from cxr.evaluation.external.privacy import FileIds, without_file_names
from cxr.evaluation.external.report import write_report
from cxr.evaluation.external_data import ExternalSet
from cxr.tracking import runs as tracking
from cxr.tracking.uris import registry_version

if TYPE_CHECKING:
    from cxr.config import Config


def log_to_mlflow(
    cfg: "Config",
    report: dict[str, Any],
    predictions: pd.DataFrame,
    folder: Path,
    ext: ExternalSet,
    model: EvaluatedModel,
    ids: FileIds,
) -> str | None:
    """An evaluation run next to the model's training run: ``external_*`` metrics, tags naming the
    served version and data, the report (in ``folder``) as artifacts with file names replaced by their
    ``ids``. Returns the run id (None when tracking is off)."""
    tags = {
        "cxr.run_type": "external_evaluation",
        "model_name": str(model.name),
        "model_version": str(model.version),
        "model_uri": str(model.uri),
        "model_run_id": str(model.run_id),
        "external_dataset_hash": ext.dataset_hash,
        "training_dataset_hash": str(model.dataset_hash),
        "endpoint": report["endpoint"],
        "external_data": ext.description[:5000],
    }
    with tracking.run(cfg, name=external_run_name(ext, model), tags=tags) as active:
        if active is None:
            return None
        import mlflow

        values = _metric_values("external_", report["metrics"])
        values |= {f"external_n_{k}": float(v) for k, v in report["requests"].items()}
        for key, entry in report["comparison"].get("metrics", {}).items():
            values[f"internal_test_{key}"] = entry["internal"]["value"]
            values[f"external_drop_{key}"] = entry["drop"]
        values |= _site_values(report.get("site_calibration"))
        values |= _ood_values(report["out_of_distribution"])
        mlflow.set_tag("ood_verdict", report["out_of_distribution"]["verdict"])
        if report.get("site_calibration"):
            mlflow.set_tags(_site_tags(report["site_calibration"]))
        if report.get("site_calibration_skipped"):
            mlflow.set_tag("site_calibration", f"skipped: {report['site_calibration_skipped']}")
        dataset = _mlflow_dataset(ext)
        mlflow.log_input(dataset, context="external_test")
        mlflow.log_metrics(values, model_id=_logged_model_id(model), dataset=dataset)
        with tempfile.TemporaryDirectory() as shared:
            if (folder / "plots").is_dir():
                shutil.copytree(folder / "plots", Path(shared) / "plots")
            write_report(*without_file_names(report, predictions, ids), Path(shared))
            mlflow.log_artifacts(shared, "external")
        return active.info.run_id


def _metric_values(prefix: str, result: dict[str, Any]) -> dict[str, float]:
    """A metrics result as MLflow metrics: each headline value and each interval's ends, under ``prefix``."""
    values = {f"{prefix}{k.replace('/', '_')}": v for k, v in metrics.headline(result).items()}
    for key, entry in result.items():
        if isinstance(entry, dict) and entry.get("ci_low") is not None:
            values[f"{prefix}{key}_ci_low"], values[f"{prefix}{key}_ci_high"] = entry["ci_low"], entry["ci_high"]
    return values


def _ood_values(part: dict[str, Any]) -> dict[str, float]:
    """The share flagged out of distribution, and the metrics on the films in distribution."""
    if not part.get("checked"):
        return {}
    inside = part.get("in_distribution_metrics")
    return {"ood_share": part["share"], "ood_flagged": float(part["flagged"])} | (
        _metric_values("external_in_distribution_", inside) if inside else {}
    )


def _site_values(part: dict[str, Any] | None) -> dict[str, float]:
    """The site operating point's metrics (evaluation part) beside the model threshold's ``external_*``."""
    if not part:
        return {}
    return _metric_values("external_site_", part["operating_points"]["site"]) | {
        "site_threshold": part["thresholds"]["site"],
        "model_threshold": part["thresholds"]["model"],
        "site_n_calibration": float(part["split"]["calibration"]["in_distribution"]),
        "site_n_evaluation": float(part["split"]["evaluation"]["in_distribution"]),
    }


def _site_tags(part: dict[str, Any]) -> dict[str, str]:
    return {
        "site_calibration": "true",
        "site_rule": json.dumps(part["rule"], sort_keys=True),
        "site_split_unit": part["split"]["unit"],
        "site_saved_as": str(part["saved_as"]),
    }


def external_run_name(ext: ExternalSet, model: EvaluatedModel) -> str:
    """What the MLflow UI lists: ``external chest_xray/test: cxr v3`` (a model directory has no version)."""
    served = f"{model.name} v{model.version}" if model.version else str(model.name or "model")
    return f"external {ext.name}: {served}"


def _mlflow_dataset(ext: ExternalSet) -> Any:
    """The external set as an MLflow dataset: content hashes and labels only, never paths or patient data."""
    import mlflow

    cols = [c for c in ("sha256", "label", "view", "sex", "age") if c in ext.table]
    table = ext.table[cols].astype({"age": float} if "age" in cols else {})  # ages may be missing
    return mlflow.data.from_pandas(table, name=f"external {ext.name}", digest=ext.dataset_hash[:32])


def _logged_model_id(model: EvaluatedModel) -> str | None:
    """The registered version's logged model: metrics linked to it show on its page next to the training
    run's test_* metrics. The embedded registry leaves ``model_id`` empty; the source URI names it."""
    entry = registry_version(f"models:/{model.name}/{model.version}") if model.version else None
    if entry is None:
        return None
    source = str(entry.source or "")
    return entry.model_id or (source.removeprefix("models:/") if source.startswith("models:/m-") else None)
