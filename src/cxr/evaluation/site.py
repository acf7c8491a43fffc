"""Site calibration: a threshold chosen on part of another hospital's labelled films, judged on the rest.

A threshold chosen on the training site's validation split does not transfer when the new site's scores
sit elsewhere (other scanners, other processing): the AUROC holds but the specificity at the model's own
threshold falls. ``--calibrate`` splits the labelled external set in two, at patient level where the table
has patient keys (else per file), stratified by label and seeded; it picks the site's threshold on the
calibration part with the model's own rule (:func:`cxr.evaluation.metrics.choose_threshold`, the function
training calls, with the method the model card records) and reports both operating points on the
evaluation part only, so neither threshold is judged on the films that chose it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cxr.data.split import merge_groups
from cxr.errors import UserError
from cxr.evaluation import metrics

# The rule when the model card records none (cards older than the threshold rule): the training default.
FALLBACK_RULE = "youden"


class CalibrationError(UserError):
    """--calibrate cannot be done as asked (size, labels, task); the message says what to change."""


@dataclass(frozen=True)
class CalibrationSplit:
    calibration: np.ndarray  # bool per row of the external table
    unit: str  # "patient" or "file"
    n_groups: tuple[int, int]  # (calibration, evaluation) patients or files


def parse_size(text: str | float | int) -> int | float:
    """``--calibrate``: a whole count of images (>= 1) or a fraction in (0, 1)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = float("nan")
    if 0 < value < 1:
        return value
    if value >= 1 and value == int(value):
        return int(value)
    raise CalibrationError(
        f"--calibrate {text!r}: give a count of images (e.g. 200) or a fraction in (0, 1) (e.g. 0.3)"
    )


def split_for_calibration(table: pd.DataFrame, size: int | float, seed: int) -> CalibrationSplit:
    """Choose about ``size`` images (a count, or a fraction of the table) for calibration, as whole patients
    (films with identical bytes count as one patient too), the same share of each label, seeded."""
    n = len(table)
    wanted = size if isinstance(size, int) else round(size * n)
    if not 0 < wanted < n:
        raise CalibrationError(f"--calibrate {size} leaves no images on one side of the {n}-image external set")
    keys = table["patient_key"] if "patient_key" in table else pd.Series([None] * n)
    unit = "patient" if keys.notna().any() else "file"
    groups = merge_groups(keys.reset_index(drop=True), table["sha256"].reset_index(drop=True))
    labels = table["label"].astype(str).to_numpy()
    chosen = _stratified_groups(groups, labels, wanted / n, np.random.default_rng(seed))
    calibration = np.isin(groups, chosen)
    n_cal = len(np.unique(groups[calibration]))
    return CalibrationSplit(calibration, unit, (n_cal, len(np.unique(groups)) - n_cal))


def _stratified_groups(groups: np.ndarray, labels: np.ndarray, share: float, rng: np.random.Generator) -> list[int]:
    """Per label (a patient's most frequent one), shuffled patients taken until ``share`` of its images."""
    frame = pd.DataFrame({"group": groups, "label": labels})
    stratum = frame.groupby("group")["label"].agg(lambda s: s.value_counts().index[0])
    sizes = frame.groupby("group").size()
    chosen: list[int] = []
    for label in sorted(stratum.unique()):
        members = stratum.index[stratum == label].to_numpy()
        members = members[rng.permutation(len(members))]
        target, taken = share * sizes[members].sum(), 0
        for g in members:
            if taken >= target:
                break
            if taken and abs(taken + sizes[g] - target) > abs(taken - target):
                continue  # this patient overshoots: a smaller one may fit
            chosen.append(int(g))
            taken += sizes[g]
    return chosen


def site_rule(model_info: dict[str, Any], target_sensitivity: float | None, cfg_target: float) -> dict[str, Any]:
    """The rule that picks the site threshold: ``--target-sensitivity`` if given, else the model card's own."""
    if target_sensitivity is not None:
        if not 0 < target_sensitivity <= 1:
            raise CalibrationError(f"--target-sensitivity {target_sensitivity}: give a value in (0, 1]")
        return {"method": "sensitivity", "target_sensitivity": target_sensitivity, "from": "--target-sensitivity"}
    method = model_info.get("threshold_method") or FALLBACK_RULE
    rule: dict[str, Any] = {"method": method, "from": "model card" if model_info.get("threshold_method") else "default"}
    if method == "sensitivity":  # the card records the rule, not its target: the configured one
        rule["target_sensitivity"] = cfg_target
    return rule


def site_threshold(y: np.ndarray, scores: np.ndarray, rule: dict[str, Any]) -> float:
    if not 0 < int(y.sum()) < len(y):
        raise CalibrationError(
            f"the calibration part ({len(y)} scored images) holds one class only; calibrate on more images"
        )
    return float(
        metrics.choose_threshold(
            y, scores, method=rule["method"], target_sensitivity=rule.get("target_sensitivity", 0.9)
        )
    )


def operating_point_tag(threshold: float, rule: dict[str, Any], n_calibration: int, dataset_hash: str) -> dict:
    """What ``--save-site`` stores on the registered version."""
    return {
        "threshold": threshold,
        "rule": {k: v for k, v in rule.items() if k != "from"},
        "n_calibration": n_calibration,
        "dataset_hash": dataset_hash,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
