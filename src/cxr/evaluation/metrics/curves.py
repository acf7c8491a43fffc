"""Curve points for plots: ROC, precision-recall and reliability (calibration), and the calibration error."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from sklearn.metrics import (
    precision_recall_curve,
    roc_curve,
)

from cxr.evaluation.metrics.checks import binary_labels, check_scores, is_probability, require_both_classes


class RocPoints(NamedTuple):
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray  # thresholds[0] is +inf (the point (0, 0))


class PrPoints(NamedTuple):
    precision: np.ndarray  # scikit-learn order: precision, recall, thresholds
    recall: np.ndarray
    thresholds: np.ndarray


class CalibrationPoints(NamedTuple):
    mean_predicted: np.ndarray  # per non-empty bin
    fraction_positive: np.ndarray
    count: np.ndarray


def roc_points(y_true: Any, y_score: Any) -> RocPoints:
    """ROC curve points for plotting (``sklearn.metrics.roc_curve``)."""
    y = binary_labels(y_true)
    s = check_scores(y_score, y.size)
    require_both_classes(y, "roc_points")
    fpr, tpr, thr = roc_curve(y, s)
    return RocPoints(fpr, tpr, thr)


def pr_points(y_true: Any, y_score: Any) -> PrPoints:
    """Precision-recall curve points for plotting (``sklearn.metrics.precision_recall_curve``)."""
    y = binary_labels(y_true)
    s = check_scores(y_score, y.size)
    require_both_classes(y, "pr_points")
    precision, recall, thr = precision_recall_curve(y, s)
    return PrPoints(precision, recall, thr)


def bin_ids(p: np.ndarray, n_bins: int) -> np.ndarray:
    # Same equal-width binning as sklearn.calibration.calibration_curve(strategy="uniform"):
    # bins are (a, b], the first one [0, b].
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], p)


def _check_probabilities(y_prob: Any, n: int, n_bins: int) -> np.ndarray:
    p = check_scores(y_prob, n, "y_prob")
    if not is_probability(p):
        raise ValueError("y_prob must be probabilities in [0, 1]")
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return p


def calibration_points(y_true: Any, y_prob: Any, n_bins: int = 10) -> CalibrationPoints:
    """Reliability-diagram points over equal-width bins on [0, 1]; empty bins are left out."""
    y = binary_labels(y_true)
    p = _check_probabilities(y_prob, y.size, n_bins)
    ids = bin_ids(p, n_bins)
    count = np.bincount(ids, minlength=n_bins)
    sum_p = np.bincount(ids, weights=p, minlength=n_bins)
    sum_y = np.bincount(ids, weights=y.astype(float), minlength=n_bins)
    nz = count > 0
    return CalibrationPoints(sum_p[nz] / count[nz], sum_y[nz] / count[nz], count[nz])


def expected_calibration_error(y_true: Any, y_prob: Any, n_bins: int = 10) -> float:
    """ECE: sum over equal-width bins of (bin share of cases) * |fraction positive - mean prob|."""
    pts = calibration_points(y_true, y_prob, n_bins)
    n = pts.count.sum()
    return float(np.sum(pts.count / n * np.abs(pts.fraction_positive - pts.mean_predicted)))
