"""Choosing a decision threshold on validation, and the confusion counts at one."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import expit, logit, ndtr
from scipy.stats import iqr as interquartile_range
from sklearn.metrics import (
    confusion_matrix,
    roc_curve,
)

from cxr.evaluation.metrics.checks import RATE_TOL, binary_labels, check_scores, check_threshold, require_both_classes


def choose_threshold(
    y_true: Any,
    y_score: Any,
    method: str = "youden",
    target_sensitivity: float = 0.9,
) -> float:
    """Choose a decision threshold on validation data (predicted positive iff score >= threshold).

    ``method="youden"``: the threshold maximising Youden's J = sensitivity + specificity - 1 on the
    empirical ROC curve; among ties the highest threshold; always one of the observed scores.
    ``method="youden_kernel"``: the cut-off maximising J on kernel-smoothed class distributions
    (:func:`_kernel_youden`), which depends far less on the few cases at the edge of each class.
    ``method="sensitivity"``: the highest threshold whose sensitivity on these data is at least
    ``target_sensitivity`` (keeps specificity as high as possible); an observed score.

    Raises ValueError for a single-class sample, an unknown method or a target outside (0, 1].
    """
    y = binary_labels(y_true)
    s = check_scores(y_score, y.size)
    require_both_classes(y, "choose_threshold")
    if method == "youden_kernel":
        return _kernel_youden(y, s)
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    # thresholds[0] is +inf (nothing predicted positive); the rest are the distinct scores.
    if method == "youden":
        j = tpr[1:] - fpr[1:]
        return float(thresholds[1:][int(np.argmax(j))])
    if method == "sensitivity":
        target = float(target_sensitivity)
        if not 0.0 < target <= 1.0:
            raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity!r}")
        idx = int(np.argmax(tpr >= target - RATE_TOL))  # first = highest threshold; tpr[-1] == 1
        return float(thresholds[idx])
    raise ValueError(f"unknown method {method!r}; use 'youden', 'youden_kernel' or 'sensitivity'")


def _kernel_youden(y: np.ndarray, s: np.ndarray, grid_points: int = 2001) -> float:
    """Youden's cut-off on Gaussian-kernel estimates of the two class distributions (Fluss et al. 2005).

    The empirical Youden cut-off sits right at the highest-scoring negatives of the validation
    sample, so a handful of cases decides it and it varies a lot between samples. Smoothing each
    class's scores (Silverman's robust bandwidth) estimates the cut-off of the underlying
    distributions instead. Probabilities are smoothed on the logit scale, where a model's scores
    are spread out; other scores as they are.
    """
    probabilities = bool(np.all((s >= 0) & (s <= 1)))
    z = logit(np.clip(s, 1e-7, 1 - 1e-7)) if probabilities else s
    grid = np.linspace(z.min(), z.max(), grid_points)
    j = _smoothed_cdf(grid, z[~y]) - _smoothed_cdf(grid, z[y])  # specificity + sensitivity - 1
    cut = float(grid[int(np.argmax(j))])
    return float(expit(cut)) if probabilities else cut


def _smoothed_cdf(grid: np.ndarray, x: np.ndarray, chunk: int = 256) -> np.ndarray:
    """The Gaussian-kernel estimate of P(X < g) for every grid point g, in chunks to bound memory."""
    iqr = float(interquartile_range(x))
    sd = float(x.std(ddof=1)) if x.size > 1 else 0.0
    spread = min(sd, iqr / 1.34) if iqr > 0 else sd
    h = max(0.9 * spread * x.size**-0.2, 1e-6)  # Silverman's rule; a floor for a class of one value
    return np.concatenate(
        [ndtr((grid[i : i + chunk, None] - x[None, :]) / h).mean(axis=1) for i in range(0, grid.size, chunk)]
    )


def confusion_at(y_true: Any, y_score: Any, threshold: float) -> dict[str, int]:
    """Confusion counts ``{"tn", "fp", "fn", "tp"}`` at exactly ``threshold`` (score >= t)."""
    y = binary_labels(y_true)
    s = check_scores(y_score, y.size)
    t = check_threshold(threshold)
    tn, fp, fn, tp = confusion_matrix(y, s >= t, labels=[False, True]).ravel()
    return {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)}
