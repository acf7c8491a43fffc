"""Binary metrics at a fixed threshold, each with a bootstrap confidence interval."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    roc_auc_score,
    roc_curve,
)

from cxr.evaluation.metrics.bootstrap import (
    RankPrep,
    ap_from_counts,
    auroc_from_counts,
    bootstrap_meta,
    collect,
    rank_counts,
    rank_prep,
    resample_weights,
    sens_at_spec_from_counts,
    with_ci,
)
from cxr.evaluation.metrics.checks import (
    RATE_TOL,
    binary_labels,
    check_bootstrap,
    check_scores,
    check_threshold,
    confusion_ratios,
    is_probability,
    json_safe,
)
from cxr.evaluation.metrics.curves import bin_ids, expected_calibration_error
from cxr.evaluation.metrics.thresholds import confusion_at

#: Specificities at which the sensitivity is reported (``sens_at_spec_0.90`` ...).
SPECIFICITY_TARGETS: tuple[float, ...] = (0.90, 0.95)


#: Metric keys of :func:`binary_metrics`, each mapping to ``{"value", "ci_low", "ci_high"}``.
BINARY_METRICS: tuple[str, ...] = (
    "auroc",
    "auprc",
    "accuracy",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "balanced_accuracy",
    "brier",
    "ece",
) + tuple(f"sens_at_spec_{s:.2f}" for s in SPECIFICITY_TARGETS)


def weighted_binary_stats(
    y: np.ndarray,
    s: np.ndarray,
    threshold: float,
    W: np.ndarray,
    *,
    calibration_bins: int = 10,
    prep: RankPrep | None = None,
) -> dict[str, np.ndarray]:
    """All binary metrics for each row of case weights W (c, n); NaN where undefined.

    With integer weights this equals the metrics of the data set that repeats case i W[b, i]
    times; with W = 1 it equals the full-sample values.
    """
    yf = y.astype(float)
    pred = (s >= threshold).astype(float)
    probs = is_probability(s)
    # One matrix product gives every per-resample sum: positives, TP, FP, squared error and
    # per-calibration-bin sum(y) - sum(p).
    columns = [np.ones_like(yf), yf, yf * pred, (1 - yf) * pred]
    if probs:
        columns.append((s - yf) ** 2)
        gap_cols = np.zeros((s.size, calibration_bins))
        gap_cols[np.arange(s.size), bin_ids(s, calibration_bins)] = yf - s
    V = np.column_stack(columns)
    if probs:
        V = np.hstack([V, gap_cols])
    sums = W @ V
    n_b, pos, tp, fp = sums[:, 0], sums[:, 1], sums[:, 2], sums[:, 3]
    out = confusion_ratios(n_b - pos - fp, fp, pos - tp, tp)
    if probs:
        out["brier"] = sums[:, 4] / n_b
        out["ece"] = np.abs(sums[:, 5:]).sum(axis=1) / n_b
    else:
        out["brier"] = out["ece"] = np.full(W.shape[0], np.nan)
    prep = prep if prep is not None else rank_prep(y, s)
    rc = rank_counts(prep, W)
    out["auroc"] = auroc_from_counts(rc)
    out["auprc"] = ap_from_counts(rc)
    for spec in SPECIFICITY_TARGETS:
        out[f"sens_at_spec_{spec:.2f}"] = sens_at_spec_from_counts(rc, spec)
    return out


def _sens_at_spec_point(y: np.ndarray, s: np.ndarray, spec: float) -> float | None:
    if y.all() or not y.any():
        return None
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    ok = (1.0 - fpr) >= spec - RATE_TOL
    return float(np.max(tpr[ok]))


def binary_metrics(
    y_true: Any,
    y_score: Any,
    threshold: float,
    *,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    calibration_bins: int = 10,
) -> dict[str, Any]:
    """Binary metrics at exactly ``threshold`` (score >= threshold is positive), with CIs.

    Returns ``{metric: {"value", "ci_low", "ci_high"}}`` for every name in
    :data:`BINARY_METRICS`, plus ``threshold``, ``n``, ``n_pos``, ``n_neg``,
    ``confusion`` ``{tn, fp, fn, tp}`` and ``bootstrap`` (settings). A single-class sample is
    allowed (rank metrics are then None). ``n_bootstrap=0`` gives no intervals.
    """
    y = binary_labels(y_true)
    s = check_scores(y_score, y.size)
    t = check_threshold(threshold)
    check_bootstrap(n_bootstrap, ci)
    if int(calibration_bins) != calibration_bins or calibration_bins < 1:
        raise ValueError(f"calibration_bins must be a positive integer, got {calibration_bins!r}")
    n, n_pos = y.size, int(y.sum())
    both = 0 < n_pos < n
    probs = is_probability(s)

    conf = confusion_at(y, s, t)
    point: dict[str, Any] = {k: v.item() for k, v in confusion_ratios(**conf).items()}
    point["auroc"] = roc_auc_score(y, s) if both else None
    point["auprc"] = average_precision_score(y, s) if both else None
    for spec in SPECIFICITY_TARGETS:
        point[f"sens_at_spec_{spec:.2f}"] = _sens_at_spec_point(y, s, spec)
    point["brier"] = brier_score_loss(y, s, pos_label=True) if probs else None
    point["ece"] = expected_calibration_error(y, s, calibration_bins) if probs else None

    prep = rank_prep(y, s)
    chunks = [
        weighted_binary_stats(y, s, t, W, calibration_bins=calibration_bins, prep=prep)
        for W in resample_weights(n, n_bootstrap, seed)
    ]
    boot = collect(chunks, BINARY_METRICS)

    out: dict[str, Any] = {k: with_ci(point[k], boot[k], ci, n_bootstrap) for k in BINARY_METRICS}
    out.update(
        threshold=t,
        n=n,
        n_pos=n_pos,
        n_neg=n - n_pos,
        confusion=conf,
        bootstrap=bootstrap_meta(n_bootstrap, ci, seed),
    )
    return json_safe(out)
