"""Metrics per subgroup (view, sex, age band) at one threshold, and the age bands (DICOM Age Strings too)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cxr.evaluation.metrics.binary import binary_metrics
from cxr.evaluation.metrics.checks import binary_labels, check_scores, check_threshold

AGE_BANDS: tuple[str, ...] = ("0-17", "18-39", "40-59", "60-79", "80+", "unknown")


MAX_PLAUSIBLE_AGE = 120


_DICOM_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)


_DICOM_AGE_DIV = {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0, "": 1.0}


def age_band(age_years: Any) -> str:
    """Age band label: "0-17", "18-39", "40-59", "60-79", "80+" or "unknown".

    Accepts numbers (years) and DICOM Age Strings such as "045Y", "006M", "010W", "003D".
    Missing, negative, non-numeric or implausible (> 120 years, a known data-entry error in
    public sets) ages are "unknown".
    """
    if age_years is None or isinstance(age_years, (bool, np.bool_)):
        return "unknown"
    if isinstance(age_years, (str, bytes)):
        text = age_years.decode("ascii", "ignore") if isinstance(age_years, bytes) else age_years
        m = _DICOM_AGE.match(text)
        if m:
            years = int(m.group(1)) / _DICOM_AGE_DIV[m.group(2).upper()]
        else:
            try:
                years = float(text)
            except ValueError:
                return "unknown"
    else:
        try:
            years = float(age_years)
        except (TypeError, ValueError):
            return "unknown"
    if not math.isfinite(years) or years < 0 or years > MAX_PLAUSIBLE_AGE:
        return "unknown"
    if years < 18:
        return "0-17"
    if years < 40:
        return "18-39"
    if years < 60:
        return "40-59"
    if years < 80:
        return "60-79"
    return "80+"


def _group_key(v: Any) -> str:
    if v is None:
        return "unknown"
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return "unknown"
    text = str(v).strip()
    return text if text else "unknown"


def subgroup_metrics(
    y_true: Any,
    y_score: Any,
    threshold: float,
    groups: Mapping[str, Sequence[Any]],
    *,
    min_size: int = 20,
    n_bootstrap: int = 200,
    ci: float = 0.95,
    seed: int = 0,
    calibration_bins: int = 10,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Binary metrics per subgroup value at the same fixed ``threshold``.

    ``groups`` maps an attribute name ("view", "sex", "age_band", ...) to one label per case;
    missing labels (None, NaN, "") become "unknown". Returns
    ``{attribute: {value: binary_metrics(...)}}``; a value with fewer than ``min_size`` cases
    is ``{"skipped": True, "n": n, "reason": ...}`` instead.
    """
    y = binary_labels(y_true)
    s = check_scores(y_score, y.size)
    t = check_threshold(threshold)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for attr, labels in groups.items():
        keys = np.array([_group_key(v) for v in labels], dtype=object)
        if keys.shape[0] != y.size:
            raise ValueError(f"group {attr!r} has {keys.shape[0]} labels but there are {y.size} cases")
        per_value: dict[str, dict[str, Any]] = {}
        for value in sorted(set(keys.tolist())):
            mask = keys == value
            size = int(mask.sum())
            if size < min_size:
                per_value[value] = {
                    "skipped": True,
                    "n": size,
                    "reason": f"fewer than {min_size} cases",
                }
                continue
            per_value[value] = binary_metrics(
                y[mask],
                s[mask],
                t,
                n_bootstrap=n_bootstrap,
                ci=ci,
                seed=seed,
                calibration_bins=calibration_bins,
            )
        out[str(attr)] = per_value
    return out
