"""The report's sections beyond the metrics: small-subgroup flags, and for a binary model a site threshold chosen
on part of the set and the score shift."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cxr.errors import UserError
from cxr.evaluation import plots, site
from cxr.evaluation.evaluate import subgroups, task_metrics
from cxr.evaluation.external.answering import EvaluatedModel

if TYPE_CHECKING:
    from cxr.config import Config


# A subgroup with fewer positives or negatives than this is flagged: its sensitivity or specificity rests
# on a handful of films, so its CI is too wide to tell it from the whole set.
MIN_SUBGROUP_CLASS = 10


def flag_small_subgroups(groups: dict[str, Any]) -> dict[str, Any]:
    """Mark subgroups with too few positives or negatives (MIN_SUBGROUP_CLASS) to say anything."""
    for values in groups.values():
        for entry in values.values():
            if not entry.get("skipped") and min(entry["n_pos"], entry["n_neg"]) < MIN_SUBGROUP_CLASS:
                entry["too_small"] = f"fewer than {MIN_SUBGROUP_CLASS} positives or negatives: CIs too wide to judge"
    return groups


@dataclass
class SiteRequest:
    """``--calibrate``: which rows choose the site threshold, with which rule, and where it is saved."""

    split: site.CalibrationSplit
    rule: dict[str, Any]
    requested: int | float
    save_as: str | None = None


class TooFewInDistribution(UserError):
    """Site calibration needs films the service decides (in distribution) in both parts."""


def site_section(
    table: pd.DataFrame,
    model: EvaluatedModel,
    y: np.ndarray,
    probs: np.ndarray,
    ok: np.ndarray,
    decided: np.ndarray,
    calibration: SiteRequest,
    cfg: "Config",
    at_model_all: dict[str, Any],
) -> dict[str, Any]:
    """The site threshold chosen on the calibration part; both operating points on the evaluation part. Both use
    the ``decided`` films only (scored and in distribution): the threshold is for the films the service decides.
    ``at_model_all``: the model's threshold on every scored film of the evaluation part (reused when all are decided)."""
    chosen = calibration.split.calibration
    cal, ev = decided & chosen, decided & ~chosen
    if len(set(y[cal].tolist())) < 2 or not ev.any():
        raise TooFewInDistribution(
            f"too few films in distribution ({int(cal.sum())} to choose a site threshold, with both labels, and "
            f"{int(ev.sum())} to check it): the service abstains on this site's films, so no threshold is chosen"
        )
    threshold = site.site_threshold(y[cal], probs[cal], calibration.rule)
    at_site_model = dataclasses.replace(model, threshold=threshold)
    if (ev == (ok & ~chosen)).all():  # every scored film decided: the report's own metrics are these
        at_model = {k: v for k, v in at_model_all.items() if k != "subgroups"}
    else:
        at_model = task_metrics(model, y[ev], probs[ev], cfg)
    at_site = task_metrics(at_site_model, y[ev], probs[ev], cfg)
    at_site["subgroups"] = flag_small_subgroups(subgroups(at_site_model, table[ev], y[ev], probs[ev], cfg))
    unit = calibration.split.unit
    return {
        "split": {
            "unit": unit,
            "seed": cfg.project.seed,
            "requested": calibration.requested,
            "calibration": _part(table, chosen, ok & chosen, cal, unit, calibration.split.n_groups[0]),
            "evaluation": _part(table, ~chosen, ok & ~chosen, ev, unit, calibration.split.n_groups[1]),
        },
        "rule": calibration.rule,
        "thresholds": {"model": model.threshold, "site": threshold},
        "operating_points": {"model": at_model, "site": at_site},
        "saved_as": None,
    }


def _part(
    table: pd.DataFrame, rows: np.ndarray, scored: np.ndarray, decided: np.ndarray, unit: str, groups: int
) -> dict[str, Any]:
    labels = table["label"][rows].value_counts().sort_index()
    return {
        "images": int(rows.sum()),
        "scored": int(scored.sum()),
        "in_distribution": int(decided.sum()),
        f"{unit}s": groups,
        "labels": {str(k): int(v) for k, v in labels.items()},
    }


def internal_scores(model: EvaluatedModel, cfg: "Config", evaluation: dict[str, Any] | None) -> dict[str, Any]:
    """The model's internal test labels and scores, as `cxr evaluate` keeps them in evaluation.json: from its
    training run (``evaluation``), else from this project's reports/ when they are of the same model."""
    reasons = []
    if model.run_id and cfg.mlflow.enabled:
        if evaluation is None:
            reasons.append(f"no evaluation.json in the model's training run {model.run_id}")
        elif "test_scores" in evaluation:
            return {"available": True, "source": f"MLflow run {model.run_id}", **evaluation["test_scores"]}
        else:
            reasons.append(f"the evaluation of run {model.run_id} kept no test scores (evaluated before they were)")
    local = Path(cfg.paths.reports) / "evaluation.json"
    if local.exists():
        found = json.loads(local.read_text())
        same = model.run_id is not None and (found.get("model") or {}).get("run_id") == model.run_id
        if same and "test_scores" in found:
            return {"available": True, "source": str(local), **found["test_scores"]}
        reasons.append(f"{local} is of another model or kept no test scores")
    reason = "; ".join(reasons) or "the model has no training run and no local evaluation of it"
    return {"available": False, "reason": f"internal test scores unavailable: {reason}"}


def score_shift(
    model: EvaluatedModel,
    y: np.ndarray,
    probs: np.ndarray,
    cfg: "Config",
    thresholds: dict[str, float],
    plots_dir: Path,
    evaluation: dict[str, Any] | None,
) -> dict[str, Any]:
    """Score distributions per true class, internal test vs external, and the share of each above each
    threshold (negatives above the model's threshold are its false positives), with two plots."""
    internal = internal_scores(model, cfg, evaluation)
    inner = (np.asarray(internal["label"]), np.asarray(internal["score"])) if internal["available"] else None
    bins = cfg.evaluate.calibration_bins
    plots.plot_reliability_shift((y, probs), inner, plots_dir / "calibration_internal_vs_external.png", bins)
    plots.plot_score_shift((y, probs), inner, model.labels, thresholds, plots_dir / "score_shift.png")
    per_class = {}
    for k, label in enumerate(model.labels):
        per_class[label] = {
            "external": _distribution(probs[y == k], thresholds),
            "internal": _distribution(inner[1][inner[0] == k], thresholds) if inner is not None else None,
        }
    return {"internal": {k: v for k, v in internal.items() if k not in ("label", "score")}, "per_class": per_class}


def _distribution(scores: np.ndarray, thresholds: dict[str, float]) -> dict[str, Any] | None:
    if scores.size == 0:
        return None
    q25, median, q75 = (float(v) for v in np.quantile(scores, [0.25, 0.5, 0.75]))
    above = {name: float(np.mean(scores >= t)) for name, t in thresholds.items()}
    return {"n": int(scores.size), "median": median, "q25": q25, "q75": q75, "above_threshold": above}
