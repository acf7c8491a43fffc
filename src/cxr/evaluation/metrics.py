"""Evaluation math: thresholds, point metrics with bootstrap confidence intervals, subgroups.

Everything here is a pure function of arrays: no file I/O, no global state. Results are plain
dicts of Python ``int``/``float``/``None``/``str``/``list`` so that they can be written with
``json.dumps(result, allow_nan=False)``; an undefined value (for example the PPV when nothing is
predicted positive, or the AUROC of a sample with one class) is ``None``, never NaN.

Conventions
-----------
* Binary labels are 0/1 (or booleans); the positive class is 1.
* A case is predicted positive when ``score >= threshold``. A threshold is chosen on the
  validation set (:func:`choose_threshold`) and then applied unchanged to the test set.
* Point estimates come from scikit-learn on the full sample. Confidence intervals are
  percentile bootstrap intervals over cases resampled with replacement. For speed the resamples
  are computed in vectorised numpy as integer case weights (resample ``b`` holds case ``i``
  ``W[b, i]`` times); the weighted formulas are exactly the metrics of the resampled data set
  (tests check this against scikit-learn). A resample where a metric is undefined (one class
  only for the rank metrics, no predicted positives for the PPV, ...) is skipped for that metric;
  when fewer than half of the resamples define the metric its interval is ``None``.
* Calibration metrics (Brier score, ECE) need probabilities; when any score lies outside [0, 1]
  they are ``None``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import sparse
from scipy.special import expit, logit, ndtr
from scipy.stats import iqr as interquartile_range
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

__all__ = [
    "BINARY_METRICS",
    "SPECIFICITY_TARGETS",
    "CalibrationPoints",
    "PrPoints",
    "RocPoints",
    "age_band",
    "binary_metrics",
    "calibration_points",
    "choose_threshold",
    "confusion_at",
    "expected_calibration_error",
    "headline",
    "multiclass_metrics",
    "multilabel_metrics",
    "pr_points",
    "roc_points",
    "subgroup_metrics",
]

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

#: A bootstrap interval is reported only when at least this fraction of resamples defines it.
MIN_VALID_BOOTSTRAP_FRACTION = 0.5
# Case-weight matrices are generated in chunks of at most this many entries (memory bound).
_CHUNK_ELEMENTS = 1_000_000
# Tolerance when comparing a rate with a target (0.9 * 100 is 90.00000000000001 in floats).
_RATE_TOL = 1e-9


# --------------------------------------------------------------------------------------------
# Input validation and output cleaning
# --------------------------------------------------------------------------------------------


def _binary_labels(y_true: Any, name: str = "y_true") -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {y.shape}")
    if y.size == 0:
        raise ValueError(f"{name} is empty: no cases to evaluate")
    if y.dtype == bool:
        return y
    if not np.issubdtype(y.dtype, np.number):
        raise ValueError(f"{name} must hold 0/1 labels, got dtype {y.dtype}")
    values = np.unique(y)
    if not np.all(np.isin(values, (0, 1))):
        raise ValueError(f"{name} must hold only 0/1 labels, found {values[:10].tolist()}")
    return y == 1


def _scores(y_score: Any, n: int, name: str = "y_score") -> np.ndarray:
    s = np.asarray(y_score, dtype=float)
    if s.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {s.shape}")
    if s.shape[0] != n:
        raise ValueError(f"{name} has {s.shape[0]} values but there are {n} labels")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return s


def _check_threshold(threshold: Any) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"threshold must be a number, got {threshold!r}") from exc
    if not math.isfinite(t):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    return t


def _check_bootstrap(n_bootstrap: int, ci: float) -> None:
    if int(n_bootstrap) != n_bootstrap or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be a non-negative integer, got {n_bootstrap!r}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci!r}")


def _is_probability(s: np.ndarray) -> bool:
    return bool(s.size) and float(s.min()) >= 0.0 and float(s.max()) <= 1.0


def _num(x: Any) -> float | None:
    """A finite Python float, or None for NaN/inf/None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _clean(obj: Any) -> Any:
    """Recursively turn numpy scalars/arrays into Python types and non-finite floats into None."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_clean(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _num(obj)
    return obj


def _div(num: Any, den: Any) -> np.ndarray:
    """Elementwise num / den with NaN where den == 0."""
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _ratios(tn: Any, fp: Any, fn: Any, tp: Any) -> dict[str, np.ndarray]:
    """Threshold metrics from confusion counts (scalars or arrays); NaN where undefined.

    Used for the point estimate and for every bootstrap resample, so both use one definition.
    """
    tn, fp, fn, tp = (np.asarray(v, dtype=float) for v in (tn, fp, fn, tp))
    sens = _div(tp, tp + fn)
    spec = _div(tn, tn + fp)
    return {
        "accuracy": _div(tp + tn, tp + tn + fp + fn),
        "sensitivity": sens,
        "specificity": spec,
        "ppv": _div(tp, tp + fp),
        "npv": _div(tn, tn + fn),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": (sens + spec) / 2,  # NaN if either is undefined
    }


# --------------------------------------------------------------------------------------------
# Thresholds and curve points
# --------------------------------------------------------------------------------------------


def _require_both_classes(y: np.ndarray, what: str) -> None:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        only = "positive" if n_pos else "negative"
        raise ValueError(f"{what} needs both positive and negative cases; all {y.size} cases are {only}")


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
    y = _binary_labels(y_true)
    s = _scores(y_score, y.size)
    _require_both_classes(y, "choose_threshold")
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
        idx = int(np.argmax(tpr >= target - _RATE_TOL))  # first = highest threshold; tpr[-1] == 1
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
    y = _binary_labels(y_true)
    s = _scores(y_score, y.size)
    t = _check_threshold(threshold)
    tn, fp, fn, tp = confusion_matrix(y, s >= t, labels=[False, True]).ravel()
    return {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)}


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
    y = _binary_labels(y_true)
    s = _scores(y_score, y.size)
    _require_both_classes(y, "roc_points")
    fpr, tpr, thr = roc_curve(y, s)
    return RocPoints(fpr, tpr, thr)


def pr_points(y_true: Any, y_score: Any) -> PrPoints:
    """Precision-recall curve points for plotting (``sklearn.metrics.precision_recall_curve``)."""
    y = _binary_labels(y_true)
    s = _scores(y_score, y.size)
    _require_both_classes(y, "pr_points")
    precision, recall, thr = precision_recall_curve(y, s)
    return PrPoints(precision, recall, thr)


def _bin_ids(p: np.ndarray, n_bins: int) -> np.ndarray:
    # Same equal-width binning as sklearn.calibration.calibration_curve(strategy="uniform"):
    # bins are (a, b], the first one [0, b].
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], p)


def _check_probabilities(y_prob: Any, n: int, n_bins: int) -> np.ndarray:
    p = _scores(y_prob, n, "y_prob")
    if not _is_probability(p):
        raise ValueError("y_prob must be probabilities in [0, 1]")
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return p


def calibration_points(y_true: Any, y_prob: Any, n_bins: int = 10) -> CalibrationPoints:
    """Reliability-diagram points over equal-width bins on [0, 1]; empty bins are left out."""
    y = _binary_labels(y_true)
    p = _check_probabilities(y_prob, y.size, n_bins)
    ids = _bin_ids(p, n_bins)
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


# --------------------------------------------------------------------------------------------
# Bootstrap machinery: integer case weights and weighted (exact) metric kernels
# --------------------------------------------------------------------------------------------


def _resample_weights(n: int, n_bootstrap: int, seed: int) -> Iterator[np.ndarray]:
    """Yield chunks (c, n) of float case counts; row b = one resample of n cases with replacement.

    Deterministic given (n, seed), and the first b resamples do not depend on n_bootstrap: metric
    families computed with the same seed on the same cases (e.g. the per-class and macro
    results of :func:`multilabel_metrics`) share their resamples.
    """
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_bootstrap, _CHUNK_ELEMENTS // max(n, 1)))
    done = 0
    while done < n_bootstrap:
        c = min(chunk, n_bootstrap - done)
        idx = rng.integers(0, n, size=(c, n))
        idx += (np.arange(c) * n)[:, None]
        yield np.bincount(idx.ravel(), minlength=c * n).reshape(c, n).astype(float)
        done += c


class _RankPrep(NamedTuple):
    """Maps each case to a score segment, so one sparse product gives all per-resample sums.

    With ``u_0 > u_1 > ... > u_{G-1}`` the distinct scores of the positive cases, segment
    ``3g`` holds the negatives scored strictly between ``u_{g-1}`` and ``u_g``, ``3g + 1`` the
    negatives tied at ``u_g``, ``3g + 2`` the positives at ``u_g`` and ``3G`` the negatives
    below ``u_{G-1}``. The ROC points that matter for AUROC, AP and sensitivity-at-specificity
    are the thresholds ``u_g`` (any other threshold is dominated by one of them).
    """

    segments: sparse.csr_matrix  # (n, 3G + 1) 0/1 case -> segment
    n_groups: int


def _rank_prep(y: np.ndarray, s: np.ndarray) -> _RankPrep:
    y = np.asarray(y, dtype=bool)
    ups = np.unique(s[y])[::-1]  # distinct positive scores, descending
    G = ups.size
    neg_up = -ups  # ascending, for searchsorted
    # number of distinct positive scores strictly above each case's score
    above = np.searchsorted(neg_up, -s, side="left")
    tied = np.zeros(s.size, dtype=bool)
    inside = above < G
    tied[inside] = ups[above[inside]] == s[inside]
    seg = np.where(y, 3 * above + 2, np.where(tied, 3 * above + 1, 3 * above))
    mat = sparse.csr_matrix((np.ones(s.size), (np.arange(s.size), seg)), shape=(s.size, 3 * G + 1))
    return _RankPrep(mat, G)


class _RankCounts(NamedTuple):
    pos_at: np.ndarray  # (c, G) weighted positives scored exactly u_g
    tp: np.ndarray  # (c, G) weighted positives scored >= u_g
    fp: np.ndarray  # (c, G) weighted negatives scored >= u_g
    neg_tie: np.ndarray  # (c, G) weighted negatives scored exactly u_g
    P: np.ndarray  # (c,)
    N: np.ndarray  # (c,)


def _rank_counts(prep: _RankPrep, W: np.ndarray) -> _RankCounts:
    sums = np.asarray(W @ prep.segments)
    G = prep.n_groups
    neg_between, neg_tie, pos_at = sums[:, 0 : 3 * G : 3], sums[:, 1 : 3 * G : 3], sums[:, 2 : 3 * G : 3]
    fp = np.cumsum(neg_between + neg_tie, axis=1)
    tp = np.cumsum(pos_at, axis=1)
    P = tp[:, -1] if G else np.zeros(W.shape[0])
    N = (fp[:, -1] if G else 0.0) + sums[:, 3 * G]
    return _RankCounts(pos_at, tp, fp, neg_tie, P, N)


def _auroc_from_counts(rc: _RankCounts) -> np.ndarray:
    # Mann-Whitney: P(score_pos > score_neg) + P(tie) / 2 over all weighted pairs.
    below = rc.N[:, None] - rc.fp  # negatives strictly below u_g
    u = np.sum(rc.pos_at * (below + 0.5 * rc.neg_tie), axis=1)
    return _div(u, rc.P * rc.N)


def _ap_from_counts(rc: _RankCounts) -> np.ndarray:
    # sklearn's average precision: sum over thresholds of (R_k - R_{k-1}) * precision_k; only
    # thresholds that add positives (the u_g) have R_k > R_{k-1}.
    precision = np.nan_to_num(_div(rc.tp, rc.tp + rc.fp))  # 0/0 only where pos_at == 0
    ap = _div(np.sum(rc.pos_at * precision, axis=1), rc.P)
    ap[rc.N == 0] = np.nan  # one class: undefined, as for the point estimate
    return ap


def _sens_at_spec_from_counts(rc: _RankCounts, spec: float) -> np.ndarray:
    N = rc.N[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = (N - rc.fp) / N >= spec - _RATE_TOL
    best = np.max(np.where(ok, rc.tp, 0.0), axis=1, initial=0.0)  # (0, 0) always qualifies
    out = _div(best, rc.P)
    out[rc.N == 0] = np.nan
    return out


def _weighted_binary_stats(
    y: np.ndarray,
    s: np.ndarray,
    threshold: float,
    W: np.ndarray,
    *,
    calibration_bins: int = 10,
    prep: _RankPrep | None = None,
) -> dict[str, np.ndarray]:
    """All binary metrics for each row of case weights W (c, n); NaN where undefined.

    With integer weights this equals the metrics of the data set that repeats case i W[b, i]
    times; with W = 1 it equals the full-sample values.
    """
    yf = y.astype(float)
    pred = (s >= threshold).astype(float)
    probs = _is_probability(s)
    # One matrix product gives every per-resample sum: positives, TP, FP, squared error and
    # per-calibration-bin sum(y) - sum(p).
    columns = [np.ones_like(yf), yf, yf * pred, (1 - yf) * pred]
    if probs:
        columns.append((s - yf) ** 2)
        gap_cols = np.zeros((s.size, calibration_bins))
        gap_cols[np.arange(s.size), _bin_ids(s, calibration_bins)] = yf - s
    V = np.column_stack(columns)
    if probs:
        V = np.hstack([V, gap_cols])
    sums = W @ V
    n_b, pos, tp, fp = sums[:, 0], sums[:, 1], sums[:, 2], sums[:, 3]
    out = _ratios(n_b - pos - fp, fp, pos - tp, tp)
    if probs:
        out["brier"] = sums[:, 4] / n_b
        out["ece"] = np.abs(sums[:, 5:]).sum(axis=1) / n_b
    else:
        out["brier"] = out["ece"] = np.full(W.shape[0], np.nan)
    prep = prep if prep is not None else _rank_prep(y, s)
    rc = _rank_counts(prep, W)
    out["auroc"] = _auroc_from_counts(rc)
    out["auprc"] = _ap_from_counts(rc)
    for spec in SPECIFICITY_TARGETS:
        out[f"sens_at_spec_{spec:.2f}"] = _sens_at_spec_from_counts(rc, spec)
    return out


def _percentile_ci(samples: np.ndarray, ci: float, n_bootstrap: int) -> tuple[Any, Any]:
    valid = samples[np.isfinite(samples)]
    if n_bootstrap == 0 or valid.size < max(2, math.ceil(MIN_VALID_BOOTSTRAP_FRACTION * n_bootstrap)):
        return None, None
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.percentile(valid, [100 * alpha, 100 * (1 - alpha)])
    return _num(lo), _num(hi)


def _with_ci(value: Any, samples: np.ndarray | None, ci: float, n_bootstrap: int) -> dict:
    value = _num(value)
    if value is None or samples is None:
        return {"value": value, "ci_low": None, "ci_high": None}
    lo, hi = _percentile_ci(samples, ci, n_bootstrap)
    return {"value": value, "ci_low": lo, "ci_high": hi}


def _collect(chunks: list[dict[str, np.ndarray]], keys: Sequence[str]) -> dict[str, np.ndarray]:
    if not chunks:
        return {k: np.empty(0) for k in keys}
    return {k: np.concatenate([c[k] for c in chunks]) for k in keys}


def _bootstrap_meta(n_bootstrap: int, ci: float, seed: int) -> dict[str, Any]:
    return {
        "n_resamples": int(n_bootstrap),
        "ci": float(ci),
        "seed": int(seed),
        "method": "percentile bootstrap over cases",
        "min_valid_fraction": MIN_VALID_BOOTSTRAP_FRACTION,
    }


# --------------------------------------------------------------------------------------------
# Binary
# --------------------------------------------------------------------------------------------


def _sens_at_spec_point(y: np.ndarray, s: np.ndarray, spec: float) -> float | None:
    if y.all() or not y.any():
        return None
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    ok = (1.0 - fpr) >= spec - _RATE_TOL
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
    y = _binary_labels(y_true)
    s = _scores(y_score, y.size)
    t = _check_threshold(threshold)
    _check_bootstrap(n_bootstrap, ci)
    if int(calibration_bins) != calibration_bins or calibration_bins < 1:
        raise ValueError(f"calibration_bins must be a positive integer, got {calibration_bins!r}")
    n, n_pos = y.size, int(y.sum())
    both = 0 < n_pos < n
    probs = _is_probability(s)

    conf = confusion_at(y, s, t)
    point: dict[str, Any] = {k: v.item() for k, v in _ratios(**conf).items()}
    point["auroc"] = roc_auc_score(y, s) if both else None
    point["auprc"] = average_precision_score(y, s) if both else None
    for spec in SPECIFICITY_TARGETS:
        point[f"sens_at_spec_{spec:.2f}"] = _sens_at_spec_point(y, s, spec)
    point["brier"] = brier_score_loss(y, s, pos_label=True) if probs else None
    point["ece"] = expected_calibration_error(y, s, calibration_bins) if probs else None

    prep = _rank_prep(y, s)
    chunks = [
        _weighted_binary_stats(y, s, t, W, calibration_bins=calibration_bins, prep=prep)
        for W in _resample_weights(n, n_bootstrap, seed)
    ]
    boot = _collect(chunks, BINARY_METRICS)

    out: dict[str, Any] = {k: _with_ci(point[k], boot[k], ci, n_bootstrap) for k in BINARY_METRICS}
    out.update(
        threshold=t,
        n=n,
        n_pos=n_pos,
        n_neg=n - n_pos,
        confusion=conf,
        bootstrap=_bootstrap_meta(n_bootstrap, ci, seed),
    )
    return _clean(out)


# --------------------------------------------------------------------------------------------
# Multiclass
# --------------------------------------------------------------------------------------------


def _class_names(classes: Sequence[Any], k: int) -> list[str]:
    names = [str(c) for c in classes]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names given for {k} score columns")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique, got {names}")
    return names


def _score_matrix(probs: Any, n: int, name: str) -> np.ndarray:
    P = np.asarray(probs, dtype=float)
    if P.ndim != 2 or P.shape[0] != n:
        raise ValueError(f"{name} must have shape (N={n}, K), got {P.shape}")
    if P.shape[1] < 2:
        raise ValueError(f"{name} needs at least two columns, got {P.shape[1]}")
    if not np.all(np.isfinite(P)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return P


def multiclass_metrics(
    y_true: Any,
    probs: Any,
    classes: Sequence[Any],
    *,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Single-label K-class metrics; the prediction is the arg-max column.

    ``accuracy``, ``balanced_accuracy``, ``macro_f1`` and ``macro_auroc`` (one-vs-rest, mean over
    classes present with both labels) carry CIs. ``per_class[name]`` holds ``auroc``, ``auprc``,
    ``sensitivity``, ``specificity``, ``ppv``, ``f1``, ``support`` (one-vs-rest, no CI).
    ``confusion_matrix`` has rows = true class, columns = predicted class.
    """
    y = np.asarray(y_true)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"y_true must be a non-empty 1-D array of class indices, got {y.shape}")
    P = _score_matrix(probs, y.size, "probs")
    K = P.shape[1]
    names = _class_names(classes, K)
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.number) and np.all(y == np.round(y))):
            raise ValueError("y_true must hold integer class indices")
        y = y.astype(int)
    if y.min() < 0 or y.max() >= K:
        raise ValueError(f"y_true class indices must be in [0, {K}), found {y.min()}..{y.max()}")
    _check_bootstrap(n_bootstrap, ci)
    n = y.size
    pred = P.argmax(axis=1)
    labels = list(range(K))
    cm = confusion_matrix(y, pred, labels=labels)

    per_class: dict[str, dict[str, Any]] = {}
    macro_set: list[int] = []
    for k, name in enumerate(names):
        yk = y == k
        both = 0 < yk.sum() < n
        if both:
            macro_set.append(k)
        tp = cm[k, k]
        fn = cm[k].sum() - tp
        fp = cm[:, k].sum() - tp
        tn = n - tp - fn - fp
        r = _ratios(tn, fp, fn, tp)
        per_class[name] = {
            "auroc": roc_auc_score(yk, P[:, k]) if both else None,
            "auprc": average_precision_score(yk, P[:, k]) if both else None,
            "sensitivity": r["sensitivity"].item(),
            "specificity": r["specificity"].item(),
            "ppv": r["ppv"].item(),
            "f1": r["f1"].item(),
            "support": int(yk.sum()),
        }
    point = {
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": _balanced_accuracy_point(y, pred),
        "macro_f1": f1_score(y, pred, average="macro", zero_division=np.nan),
        "macro_auroc": (float(np.mean([per_class[names[k]]["auroc"] for k in macro_set])) if macro_set else None),
    }

    preps = {k: _rank_prep(y == k, P[:, k]) for k in macro_set}
    chunks = [_weighted_multiclass_stats(y, pred, K, W, preps) for W in _resample_weights(n, n_bootstrap, seed)]
    boot = _collect(chunks, list(point))
    out: dict[str, Any] = {k: _with_ci(v, boot[k], ci, n_bootstrap) for k, v in point.items()}
    out.update(
        n=n,
        classes=names,
        per_class=per_class,
        confusion_matrix=cm.tolist(),
        confusion_matrix_axes="rows: true class, columns: predicted class",
        macro_auroc_classes=[names[k] for k in macro_set],
        bootstrap=_bootstrap_meta(n_bootstrap, ci, seed),
    )
    return _clean(out)


def _balanced_accuracy_point(y: np.ndarray, pred: np.ndarray) -> float:
    # sklearn's definition (mean recall over classes present in y_true); it warns when y_pred
    # has classes absent from y_true, which is expected on small samples.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y, pred))


def _nanmean_rows(a: np.ndarray) -> np.ndarray:
    valid = np.isfinite(a)
    cnt = valid.sum(axis=1)
    tot = np.where(valid, a, 0.0).sum(axis=1)
    return _div(tot, cnt)


def _weighted_multiclass_stats(
    y: np.ndarray, pred: np.ndarray, K: int, W: np.ndarray, preps: Mapping[int, _RankPrep]
) -> dict[str, np.ndarray]:
    """Multiclass summary metrics for each row of case weights W (c, n); NaN where undefined.

    ``preps`` holds the one-vs-rest rank data of the classes averaged into ``macro_auroc``; a
    resample where any of them has a single label gives NaN (skipped).
    """
    n = y.size
    onehot_cell = np.zeros((n, K * K))
    onehot_cell[np.arange(n), y * K + pred] = 1.0
    cmb = (W @ onehot_cell).reshape(-1, K, K)  # rows: true, columns: predicted
    diag = np.diagonal(cmb, axis1=1, axis2=2)
    rows, cols = cmb.sum(axis=2), cmb.sum(axis=1)
    recall = _div(diag, rows)  # NaN for classes absent from the resample's truth
    f1 = _div(2 * diag, rows + cols)  # NaN for classes neither true nor predicted
    aucs = [_auroc_from_counts(_rank_counts(prep, W)) for prep in preps.values()]
    return {
        "accuracy": diag.sum(axis=1) / W.sum(axis=1),
        "balanced_accuracy": _nanmean_rows(recall),
        "macro_f1": _nanmean_rows(f1),
        "macro_auroc": np.mean(aucs, axis=0) if aucs else np.full(W.shape[0], np.nan),
    }


# --------------------------------------------------------------------------------------------
# Multilabel
# --------------------------------------------------------------------------------------------


def multilabel_metrics(
    Y: Any,
    P: Any,
    classes: Sequence[Any],
    thresholds: Any,
    *,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    per_class_bootstrap: int | None = None,
    calibration_bins: int = 10,
) -> dict[str, Any]:
    """Multi-label metrics: each column is an independent binary task with its own threshold.

    ``per_class[name]`` is :func:`binary_metrics` of that column at ``thresholds[k]`` (with
    ``per_class_bootstrap`` resamples, default ``n_bootstrap``). ``macro_auroc`` and
    ``macro_auprc`` (with CIs; resamples shared across classes so label correlation is kept)
    average the classes that have both labels; single-label classes have ``auroc``/``auprc``
    None and are listed in ``excluded_from_macro``.
    """
    Yarr = np.asarray(Y)
    if Yarr.ndim != 2 or Yarr.shape[0] == 0:
        raise ValueError(f"Y must have shape (N, K) with N > 0, got {Yarr.shape}")
    n, K = Yarr.shape
    S = _score_matrix(P, n, "P")
    if S.shape[1] != K:
        raise ValueError(f"Y has {K} columns but P has {S.shape[1]}")
    names = _class_names(classes, K)
    thr = np.asarray(thresholds, dtype=float).reshape(-1)
    if thr.shape != (K,):
        raise ValueError(f"thresholds must have {K} values, got {thr.shape[0]}")
    _check_bootstrap(n_bootstrap, ci)
    pcb = n_bootstrap if per_class_bootstrap is None else per_class_bootstrap
    cols = [_binary_labels(Yarr[:, k], f"Y[:, {k}]") for k in range(K)]

    per_class = {
        names[k]: binary_metrics(
            cols[k],
            S[:, k],
            thr[k],
            n_bootstrap=pcb,
            ci=ci,
            seed=seed,
            calibration_bins=calibration_bins,
        )
        for k in range(K)
    }
    macro_set = [k for k in range(K) if 0 < cols[k].sum() < n]
    point = {
        "macro_auroc": np.mean([per_class[names[k]]["auroc"]["value"] for k in macro_set]) if macro_set else None,
        "macro_auprc": np.mean([per_class[names[k]]["auprc"]["value"] for k in macro_set]) if macro_set else None,
    }
    preps = {k: _rank_prep(cols[k], S[:, k]) for k in macro_set}
    chunks = []
    if macro_set:
        for W in _resample_weights(n, n_bootstrap, seed):
            aucs, aps = [], []
            for k in macro_set:
                rc = _rank_counts(preps[k], W)
                aucs.append(_auroc_from_counts(rc))
                aps.append(_ap_from_counts(rc))
            chunks.append({"macro_auroc": np.mean(aucs, axis=0), "macro_auprc": np.mean(aps, axis=0)})
    boot = _collect(chunks, list(point))
    out: dict[str, Any] = {k: _with_ci(v, boot[k] if macro_set else None, ci, n_bootstrap) for k, v in point.items()}
    out.update(
        n=n,
        classes=names,
        thresholds=thr.tolist(),
        per_class=per_class,
        macro_classes=[names[k] for k in macro_set],
        excluded_from_macro=[names[k] for k in range(K) if k not in macro_set],
        bootstrap=_bootstrap_meta(n_bootstrap, ci, seed),
    )
    return _clean(out)


# --------------------------------------------------------------------------------------------
# Subgroups
# --------------------------------------------------------------------------------------------

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
    y = _binary_labels(y_true)
    s = _scores(y_score, y.size)
    t = _check_threshold(threshold)
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


# --------------------------------------------------------------------------------------------
# Headline numbers
# --------------------------------------------------------------------------------------------

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-/]+")


def headline(metrics_dict: Mapping[str, Any], *, prefix: str = "", per_class: bool = False) -> dict[str, float]:
    """Flat ``{name: value}`` of the top-level ``{"value": ...}`` entries (for DVC / MLflow).

    Undefined (None) values are left out. With ``per_class=True`` the per-class AUROC/AUPRC
    of a multiclass or multilabel result are added as ``"auroc/<class>"``, ``"auprc/<class>"``.
    """
    out: dict[str, float] = {}
    for key, entry in metrics_dict.items():
        if isinstance(entry, Mapping) and "value" in entry:
            v = _num(entry["value"])
            if v is not None:
                out[f"{prefix}{key}"] = v
    if per_class and isinstance(metrics_dict.get("per_class"), Mapping):
        for name, entry in metrics_dict["per_class"].items():
            safe = _KEY_UNSAFE.sub("_", str(name))
            for metric in ("auroc", "auprc"):
                val = entry.get(metric) if isinstance(entry, Mapping) else None
                if isinstance(val, Mapping):
                    val = val.get("value")
                v = _num(val)
                if v is not None:
                    out[f"{prefix}{metric}/{safe}"] = v
    return out
