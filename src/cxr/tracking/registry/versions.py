"""Registering a trained model as a version: its evaluation and lineage as tags, a model card, the ONNX graph; listing versions."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr.models.card import ModelCard
from cxr.models.predictor import CARD_FILE
from cxr.tracking import runs as tracking
from cxr.tracking.onnx_artifacts import ONNX_TAG, log_onnx
from cxr.tracking.registry.errors import RegistryError
from cxr.tracking.registry.gate import candidate_checks, four_places, val_auroc_interval
from cxr.tracking.version_card import describe

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from cxr.config import Config

log = logging.getLogger(__name__)


# Training-run metrics put on the version when no evaluation gives the number (a tuning trial's objective).
RUN_METRIC_TAGS = {
    "val_auroc": ("best_val_auroc",),
    "val_auroc_augmented": ("best_val_auroc_augmented",),
}


RUN_TAGS = ("git_commit", "git_dirty")


TEST_METRICS = ("accuracy", "sensitivity", "specificity")  # test numbers shown beside the AUROC in `cxr models`


def registry_client(cfg: "Config") -> "MlflowClient":
    from mlflow import MlflowClient

    tracking.configure(cfg)
    return MlflowClient()


def _model_dir_run_id(cfg: "Config") -> str:
    card_path = Path(cfg.paths.model) / CARD_FILE
    if not card_path.exists():
        raise RegistryError(f"no trained model at {cfg.paths.model}; train one (`cxr train`) or pass --run-id")
    run_id = ModelCard.from_json(card_path.read_text(), str(card_path)).training.run_id
    if not run_id:
        raise RegistryError(f"the model at {cfg.paths.model} was trained without MLflow (mlflow.enabled=false)")
    return run_id


def _logged_evaluation(run_id: str) -> dict[str, Any] | None:
    """The evaluation `cxr evaluate` logged to the run (None if it never ran)."""
    try:
        report = tracking.logged_evaluation(run_id)
    except ValueError:  # not JSON: refused below like any other malformed report
        report = {}
    if report is None:
        return None
    where = f"runs:/{run_id}/{tracking.EVALUATION_ARTIFACT}"
    if not isinstance(report, dict) or not isinstance(report.get("splits"), dict) or not report.get("data"):
        raise RegistryError(f"{where} is not an evaluation report; run `cxr evaluate` again")
    return report


def _auroc(result: dict[str, Any]) -> dict[str, Any]:
    """The split's AUROC entry: binary ``auroc``, or ``macro_auroc`` for multiclass/multilabel."""
    entry = result.get("auroc") or result.get("macro_auroc")
    return entry if isinstance(entry, dict) else {}


def evaluation_tags(report: dict[str, Any] | None) -> dict[str, str]:
    """What the gate judges, from the evaluation the version was registered with."""
    if report is None:
        return {"evaluated": "false"}
    tags = {"evaluated": "true", "eval_dataset_hash": str(report["data"].get("dataset_hash"))}
    for split, result in report["splits"].items():
        auc = _auroc(result)
        spread = result.get("scores") or {}
        numbers = {
            f"{split}_auroc": auc.get("value"),
            f"{split}_auroc_ci_low": auc.get("ci_low"),
            f"{split}_auroc_ci_high": auc.get("ci_high"),
            f"{split}_score_std": spread.get("std"),
            f"{split}_positive_share": spread.get("predicted_positive_share"),
        }
        if split == "test":
            numbers |= {f"test_{k}": (result.get(k) or {}).get("value") for k in TEST_METRICS}
        tags |= {k: f"{v:.6f}" for k, v in numbers.items() if v is not None}
        if spread.get("distinct_predictions") is not None:
            tags[f"{split}_distinct_predictions"] = str(spread["distinct_predictions"])
    return tags


WEIGHTS_TAG = "weights_sha256"  # the service refuses a version whose stored weights no longer match it


def version_tags(
    run_id: str, card: ModelCard, run_tags: dict[str, str], run_metrics: dict[str, float], report: Any
) -> dict[str, str]:
    """The version's tags: the model card's facts, the run's lineage, and the evaluation it came with."""
    tags = {
        "run_id": run_id,
        "arch": card.arch,
        "task": card.task,
        "labels": json.dumps(card.labels),
        "threshold": json.dumps(card.threshold),
        "threshold_method": str(card.threshold_method),
        "dataset_hash": card.training.dataset_hash,
        "data_source": card.training.source,
        "synthetic_data": str(card.training.synthetic).lower(),
        "ood_method": card.ood.method if card.ood else "none",
    }
    if card.weights_sha256:
        tags[WEIGHTS_TAG] = card.weights_sha256
    if card.ood:
        tags |= {"ood_threshold": f"{card.ood.threshold:.6f}", "ood_val_pass_rate": f"{card.ood.val_pass_rate:.4f}"}
    tags |= {k: run_tags[k] for k in RUN_TAGS if k in run_tags}
    for tag, names in RUN_METRIC_TAGS.items():
        value = next((run_metrics[n] for n in names if n in run_metrics), None)
        if value is not None:
            tags[tag] = f"{value:.6f}"
    return tags | evaluation_tags(report)


def register(cfg: "Config", run_id: str | None = None) -> "ModelVersion":
    """A new version of ``mlflow.registered_model`` from a training run (default: the one behind paths.model).

    The version records the evaluation the run came with (tags the gate judges) and carries a model card
    in Markdown as its description.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = registry_client(cfg)
    run_id = run_id or _model_dir_run_id(cfg)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise RegistryError(
            f"run {run_id} is not in the tracking store {mlflow.get_tracking_uri()}: {exc.message}"
        ) from None
    model_uri = run.data.tags.get("model_uri")
    if not model_uri:
        raise RegistryError(f"run {run_id} logged no model (trained with log_model off?); retrain with `cxr train`")
    where = f"runs:/{run_id}/{tracking.MODEL_CARD_ARTIFACT}"
    card = ModelCard.from_json(mlflow.artifacts.load_text(where), where)
    report = _logged_evaluation(run_id)
    tags = version_tags(run_id, card, run.data.tags, run.data.metrics, report)
    onnx_sha256 = log_onnx(client, model_uri)  # the graph travels with the version's artifacts
    tags |= {ONNX_TAG: onnx_sha256} if onnx_sha256 else {}
    name = cfg.mlflow.registered_model
    same = _same_registration(client, name, tags)
    if same is not None:
        log.info("run %s with this evaluation already is %s version %s", run_id, name, same.version)
        return same
    version = mlflow.register_model(model_uri, name, tags=tags)
    findings = [f"rule {d.rule}: {d.reason}" for d in candidate_checks(tags)]
    description = describe(name, str(version.version), card, tags, report, findings)
    client.update_model_version(name, version.version, description=description)
    return client.get_model_version(name, version.version)


def _same_registration(client: "MlflowClient", name: str, tags: dict[str, str]) -> "ModelVersion | None":
    """The version that already holds this run with this evaluation: registering twice adds no duplicate."""
    found = client.search_model_versions(f"name = '{name}'")
    return next((v for v in found if all(v.tags.get(k) == value for k, value in tags.items())), None)


def champion(cfg: "Config", client: "MlflowClient | None" = None) -> "ModelVersion | None":
    from mlflow.exceptions import MlflowException

    client = client or registry_client(cfg)
    try:
        return client.get_model_version_by_alias(cfg.mlflow.registered_model, cfg.registry.alias)
    except MlflowException:
        return None


def version_entry(client: "MlflowClient", name: str, version: str | int) -> "ModelVersion":
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"registered model {name!r} has no version {version}; see `cxr models`") from None


def versions(cfg: "Config") -> list[dict[str, Any]]:
    """Versions (newest first) with their aliases and metrics, for `cxr models`."""
    client = registry_client(cfg)
    name = cfg.mlflow.registered_model
    found = client.search_model_versions(f"name = '{name}'")
    aliases: dict[str, list[str]] = {}
    try:
        for alias, version in client.get_registered_model(name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
    except Exception:  # no such model yet: no aliases
        pass
    rows = []
    for v in sorted(found, key=lambda v: int(v.version), reverse=True):
        rows.append(
            {
                "version": str(v.version),
                "aliases": sorted(aliases.get(str(v.version), [])),
                "created": dt.datetime.fromtimestamp(v.creation_timestamp / 1000, dt.UTC).isoformat(timespec="seconds"),
                "run_id": v.run_id or v.tags.get("run_id"),
                "arch": v.tags.get("arch"),
                "evaluated": v.tags.get("evaluated", "?"),
                "val_auroc": four_places(v.tags.get("val_auroc")),
                "val_auroc_ci": val_auroc_interval(v.tags),
                **{k: four_places(v.tags.get(k)) for k in ("test_auroc", "test_accuracy", "threshold")},
                "dataset_hash": (v.tags.get("dataset_hash") or "")[:12],
            }
        )
    return rows
