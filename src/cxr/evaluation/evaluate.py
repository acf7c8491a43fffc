"""evaluate(cfg): the trained model on validation and test, with CIs, subgroups and plots.

The threshold is the one stored in the model (chosen on validation at training time) and is applied
unchanged to test. Scores come from the Predictor, the same object the service uses.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cxr.data.loader import PreparedData
from cxr.errors import UserError
from cxr.evaluation import metrics, plots
from cxr.models.predictor import Predictor
from cxr.task import Task
from cxr.tracking import runs as tracking
from cxr.tracking.uris import load_predictor

if TYPE_CHECKING:
    import pandas as pd

    from cxr.config import Config

log = logging.getLogger(__name__)


class ModelTask(Protocol):
    """What scoring needs to know about a model: a Predictor, or a served model's /metadata."""

    task: Task
    labels: list[str]
    threshold: Any


def score_split(predictor: Predictor, data: PreparedData, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = data.split(split)
    tab = data.tabular[idx] if predictor.uses_tabular else None
    return idx, data.targets[idx], predictor.predict_proba(data.images[idx], tab)


def task_metrics(predictor: ModelTask, y: np.ndarray, probs: np.ndarray, cfg: "Config") -> dict[str, Any]:
    ev = cfg.evaluate
    kw = {"n_bootstrap": ev.bootstrap, "ci": ev.ci, "seed": cfg.project.seed}
    if predictor.task.binary:
        return metrics.binary_metrics(y, probs, predictor.threshold, calibration_bins=ev.calibration_bins, **kw)
    if predictor.task.exclusive:
        return metrics.multiclass_metrics(y, probs, predictor.labels, **kw)
    return metrics.multilabel_metrics(
        y, probs, predictor.labels, predictor.threshold, per_class_bootstrap=min(ev.bootstrap, 200), **kw
    )


def score_spread(predictor: ModelTask, probs: np.ndarray) -> dict[str, Any]:
    """How much the scores vary and how many distinct answers they give at the model's threshold.

    What the promotion gate reads to tell a model that ranks cases from one that answers (nearly) the
    same for everyone: ``std`` is the largest per-class standard deviation of the probabilities,
    ``distinct_predictions`` the number of different predicted outcomes (classes, or label sets).
    """
    scores = probs.reshape(len(probs), -1).astype(np.float64)
    if predictor.task.exclusive:
        predicted = np.argmax(scores, axis=1)[:, None]
    else:
        threshold = 0.5 if predictor.threshold is None else predictor.threshold
        predicted = scores >= np.asarray(threshold, dtype=np.float64)
    out: dict[str, Any] = {
        "std": float(scores.std(axis=0).max()) if len(scores) else None,
        "distinct_predictions": len(np.unique(predicted, axis=0)),
    }
    if predictor.task.binary:
        out["predicted_positive_share"] = float(predicted.mean()) if len(scores) else None
    return out


def subgroups(
    predictor: ModelTask, rows: "pd.DataFrame", y: np.ndarray, probs: np.ndarray, cfg: "Config"
) -> dict[str, Any]:
    """Binary metrics per view, sex and age band (manifest columns of the scored rows, in order)."""
    if not predictor.task.binary:
        return {}
    groups = subgroup_values(rows)
    if not groups:
        return {}
    return metrics.subgroup_metrics(y, probs, predictor.threshold, groups, ci=cfg.evaluate.ci, seed=cfg.project.seed)


def subgroup_values(rows: "pd.DataFrame") -> dict[str, list[Any]]:
    """Each row's view, sex and age band, for the attributes with more than one known value (a single one says
    nothing about subgroups)."""
    groups = {
        "view": rows["view"].tolist(),
        "sex": rows["sex"].tolist(),
        "age_band": [metrics.age_band(a) for a in rows["age"]],
    }
    return {k: v for k, v in groups.items() if len({g for g in v if g not in (None, "", "unknown") and g == g}) > 1}


def plots_for(
    predictor: ModelTask, y: np.ndarray, probs: np.ndarray, result: dict[str, Any], out: Path, bins: int
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    if predictor.task.binary:
        cm = result["confusion"]
        figures = [
            plots.plot_confusion([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]], predictor.labels, out / "confusion.png"),
            plots.plot_calibration(y, probs, out / "calibration.png", bins=bins),
        ]
        if 0 < y.sum() < len(y):  # curves need both classes
            figures += [
                plots.plot_roc(y, probs, out / "roc.png", threshold=predictor.threshold),
                plots.plot_pr(y, probs, out / "pr.png", threshold=predictor.threshold),
            ]
        else:
            log.warning("the evaluated split has one class only: no ROC/PR curves")
        return figures
    if predictor.task.exclusive:
        return [
            plots.plot_roc_per_class(y, probs, predictor.labels, out / "roc.png"),
            plots.plot_confusion(result["confusion_matrix"], predictor.labels, out / "confusion.png"),
        ]
    return [plots.plot_roc_per_class(y, probs, predictor.labels, out / "roc.png")]


def evaluate(cfg: "Config", model_dir: str | Path | None = None) -> dict[str, Any]:
    """Score val and test; write reports/metrics.json, reports/evaluation.json and PNG plots."""
    predictor = load_predictor(model_dir or cfg.paths.model)
    data = PreparedData(cfg.paths.prepared, predictor.spec.size)
    if data.task != predictor.task or data.classes != predictor.labels:
        raise UserError(
            f"the model predicts {predictor.task} {predictor.labels} but the prepared data is {data.task} {data.classes}"
        )
    card = predictor.card.to_dict()
    same_data = predictor.card.training.dataset_hash == data.card["dataset_hash"]
    if not same_data:
        log.warning("evaluating on a prepared dataset other than the one the model was trained on")
    reports = Path(cfg.paths.reports)
    report: dict[str, Any] = {
        "model": {
            "task": predictor.task,
            "labels": predictor.labels,
            "threshold": predictor.threshold,
            "threshold_method": card.get("threshold_method"),
            "threshold_augmented_copies": card["threshold_augmented_copies"],
            **card["training"],
        },
        "data": {
            "source": data.card["source"],
            "synthetic": data.card.get("synthetic", False),
            "dataset_hash": data.card["dataset_hash"],
            "same_data_as_training": same_data,
        },
        "splits": {},
    }
    figures: list[Path] = []
    for split in ("val", "test"):
        idx, y, probs = score_split(predictor, data, split)
        if len(idx) == 0:
            continue
        result = task_metrics(predictor, y, probs, cfg)
        result["subgroups"] = subgroups(predictor, data.manifest.iloc[idx], y, probs, cfg)
        result["scores"] = score_spread(predictor, probs)
        report["splits"][split] = result
        if split == "test" and predictor.task.binary:
            # labels and scores (no image ids): an external evaluation compares its score shift with them
            report["test_scores"] = {"label": y.tolist(), "score": [round(float(p), 6) for p in probs]}
        if split == "test" or "test" not in set(data.manifest["split"]):
            figures = plots_for(predictor, y, probs, result, reports / "plots", cfg.evaluate.calibration_bins)
    if not report["splits"]:
        raise UserError("the prepared data has neither a val nor a test split to evaluate on")
    summary = {split: metrics.headline(r) for split, r in report["splits"].items()}
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "metrics.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    (reports / "evaluation.json").write_text(json.dumps(report, indent=2, allow_nan=False, default=str) + "\n")
    _log_to_mlflow(cfg, predictor, summary, reports, figures)
    return report


def _log_to_mlflow(
    cfg: "Config", predictor: Predictor, summary: dict[str, dict[str, float]], reports: Path, figures: list[Path]
) -> None:
    """Results go to the training run, so one MLflow run holds a model's whole story."""
    if not cfg.mlflow.enabled:
        return
    import mlflow

    tracking.configure(cfg)
    run_id = predictor.card.training.run_id
    fresh = f"evaluate {predictor.card.arch} {predictor.spec.size}px"  # a model with no run in this store
    try:
        ctx = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=fresh)
    except Exception:  # the training run lives in another tracking store: log a fresh run instead
        ctx = mlflow.start_run(run_name=fresh)
    with ctx:
        for split, values in summary.items():
            # "val_auroc" is the per-epoch training curve; the final validation numbers get their own prefix
            prefix = "test_" if split == "test" else f"eval_{split}_"
            mlflow.log_metrics({f"{prefix}{k.replace('/', '_')}": v for k, v in values.items()})
        mlflow.log_artifact(str(reports / "evaluation.json"), "evaluation")
        for fig in figures:
            mlflow.log_artifact(str(fig), "evaluation/plots")
