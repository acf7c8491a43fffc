"""The external report: metrics with CIs, subgroups, failures, comparison, predictions, written as files."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from cxr.errors import UserError
from cxr.evaluation.evaluate import plots_for, subgroups, task_metrics
from cxr.evaluation.external.answering import EvaluatedModel
from cxr.evaluation.external.internal import compare, internal_metrics, training_evaluation
from cxr.evaluation.external.privacy import LOCAL_NAMES_NOTE, FileIds
from cxr.evaluation.external.scoring import Scored, row_scores
from cxr.evaluation.external.sections import (
    SiteRequest,
    TooFewInDistribution,
    flag_small_subgroups,
    score_shift,
    site_section,
)
from cxr.evaluation.external_data import ExternalSet, map_labels, targets
from cxr.evaluation.ood_report import ood_flags, ood_section
from cxr.evaluation.report_html import render
from cxr.serving.client import Answer

if TYPE_CHECKING:
    from cxr.config import Config


REPORT_DIR = "report"


def build_report(
    ext: ExternalSet,
    model: EvaluatedModel,
    scored: Scored,
    cfg: "Config",
    endpoint: str,
    plots_dir: Path,
    calibration: SiteRequest | None = None,
) -> dict[str, Any]:
    """The report; with ``calibration`` every metric, plot and subgroup is on the evaluation part only."""
    table, answers = ext.table, scored.answers
    mapping = map_labels(table["label"].tolist(), model.labels, model.task)
    y = targets(table["label"], model.labels, model.task)
    ok, probs = row_scores(answers, model)
    checked, outside = ood_flags(answers)
    rows = ok if calibration is None else ok & ~calibration.split.calibration
    if not rows.any():
        raise UserError("none of the evaluation part's images was scored; calibrate on fewer images")
    result = task_metrics(model, y[rows], probs[rows], cfg)
    result["subgroups"] = flag_small_subgroups(subgroups(model, table[rows], y[rows], probs[rows], cfg))
    plots_for(model, y[rows], probs[rows], result, plots_dir, cfg.evaluate.calibration_bins)
    evaluation = training_evaluation(model, cfg)
    internal = internal_metrics(model, cfg, evaluation)
    comparison = {**internal, "metrics": compare(internal["metrics"], result)} if internal["available"] else internal
    report = {
        **report_header(ext, model, scored, endpoint, mapping),
        "failures": failures_of(table, answers),
        "service_warnings": warning_kinds(answers),
        "out_of_distribution": ood_section(model, table, ok, rows, outside, y, probs, cfg, checked),
        "metrics": result,
        "comparison": comparison,
    }
    if not model.task.binary:
        return report
    thresholds = {"model": model.threshold}
    if calibration is not None:
        try:
            decided = ok & ~outside
            report["site_calibration"] = site_section(table, model, y, probs, ok, decided, calibration, cfg, result)
            thresholds["site"] = report["site_calibration"]["thresholds"]["site"]
        except TooFewInDistribution as exc:  # the report still says what the model did with these films
            report["site_calibration_skipped"] = str(exc)  # said by the CLI with the tables
    report["score_shift"] = score_shift(model, y[rows], probs[rows], cfg, thresholds, plots_dir, evaluation)
    return report


def report_header(
    ext: ExternalSet, model: EvaluatedModel, scored: Scored, endpoint: str, mapping: dict[str, Any]
) -> dict[str, Any]:
    """What was evaluated, on what, and how the requests went."""
    table, counts = ext.table, Counter(a.status for a in scored.answers)
    return {
        "kind": "external_evaluation",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "endpoint": endpoint,
        "model": {
            **model.stamp(),
            "task": model.task,
            "labels": model.labels,
            "threshold": model.threshold,
            "run_id": model.run_id,
            "training_dataset_hash": model.dataset_hash,
        },
        "data": {
            "description": ext.description,
            "dataset_hash": ext.dataset_hash,
            "n_images": len(table),
            "label_mapping": mapping,
            "notes": [*ext.notes, LOCAL_NAMES_NOTE],
            "labels": {str(k): int(v) for k, v in table["label"].value_counts().sort_index().items()},
        },
        "requests": {
            "sent": scored.sent,
            "from_cache": scored.cached,
            "ok": counts["ok"],
            "refused": counts["refused"],
            "failed": counts["failed"],
        },
    }


def failures_of(table: pd.DataFrame, answers: list[Answer]) -> list[dict[str, Any]]:
    """Every file that got no answer, and why."""
    return [
        {"file": row.file, "label": row.label, "status": a.status, "http_status": a.http_status, "error": a.error}
        for row, a in zip(table.itertuples(), answers)
        if a.status != "ok"
    ]


def warning_kinds(answers: list[Answer]) -> dict[str, int]:
    """The service's warnings counted by kind (the text before the per-image numbers): readable on big sets."""
    return dict(
        Counter(w.split(":")[0] for a in answers if a.status == "ok" for w in (a.response or {}).get("warnings") or [])
    )


def predictions_table(ext: ExternalSet, model: EvaluatedModel, answers: list[Answer], ids: FileIds) -> pd.DataFrame:
    """One row per image: what the model said (no paths outside the data folder, no patient data), with the
    file's name and its id (``ids``), as MLflow's copy names it."""
    rows = []
    for row, a in zip(ext.table.itertuples(), answers):
        r = a.response or {}
        rows.append(
            {
                "file": row.file,
                "file_id": ids(row.file),
                "sha256": row.sha256,
                "label": row.label,
                "status": a.status,
                "prediction": json.dumps(r.get("prediction")) if a.status == "ok" else "",
                "in_distribution": (r.get("ood") or {}).get("in_distribution"),
                "ood_score": (r.get("ood") or {}).get("score"),
                "warnings": "; ".join(r.get("warnings") or []),
                **{f"p_{lab}": (r.get("probabilities") or {}).get(lab) for lab in model.labels},
            }
        )
    return pd.DataFrame(rows)


def write_report(report: dict[str, Any], predictions: pd.DataFrame, folder: Path) -> None:
    """external.json, external.html (self-contained, the plots in ``folder/plots`` embedded), predictions.csv."""

    (folder / "external.json").write_text(json.dumps(report, indent=2, allow_nan=False, default=str) + "\n")
    (folder / "external.html").write_text(render(report, sorted((folder / "plots").glob("*.png"))))
    predictions.to_csv(folder / "predictions.csv", index=False)
