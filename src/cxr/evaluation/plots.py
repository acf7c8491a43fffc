"""Evaluation plots written as PNG files.

Figures are drawn with ``matplotlib.figure.Figure`` on an Agg canvas, never through
``matplotlib.pyplot``: importing this module neither selects a global backend nor keeps figures
alive in pyplot's registry, so it is safe in servers, workers and notebooks alike. Every function
writes one PNG (100 dpi, 5 x 5 inches unless many classes need more room), creates the parent
folder if needed and returns the path. The numbers shown come from :mod:`cxr.evaluation.metrics`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import average_precision_score, roc_auc_score

from cxr.evaluation import metrics as M

__all__ = [
    "DPI",
    "FIGSIZE",
    "plot_calibration",
    "plot_confusion",
    "plot_pr",
    "plot_roc",
    "plot_reliability_shift",
    "plot_roc_per_class",
    "plot_score_shift",
]

DPI = 100
FIGSIZE = (5.0, 5.0)
_OP_STYLE = {"marker": "o", "markersize": 8, "color": "tab:red", "linestyle": "none", "zorder": 5}


def _figure(figsize: tuple[float, float] = FIGSIZE) -> Figure:
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png")
    return out


def _unit_axes(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=10)
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _operating_point(y_true: Any, y_score: Any, threshold: float) -> dict[str, float | None]:
    c = M.confusion_at(y_true, y_score, threshold)
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    return {
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "ppv": tp / (tp + fp) if tp + fp else None,
    }


def plot_roc(
    y_true: Any,
    y_score: Any,
    path: str | os.PathLike[str],
    *,
    threshold: float | None = None,
    title: str = "ROC curve",
) -> Path:
    """ROC curve with the AUROC in the legend and, if given, the operating point at ``threshold``."""
    pts = M.roc_points(y_true, y_score)  # raises ValueError for a single-class sample
    auc = roc_auc_score(np.asarray(y_true), np.asarray(y_score, dtype=float))
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance (AUROC = 0.5)")
    ax.plot(pts.fpr, pts.tpr, color="tab:blue", linewidth=2, label=f"model (AUROC = {auc:.3f})")
    if threshold is not None:
        op = _operating_point(y_true, y_score, threshold)
        ax.plot(
            [1 - op["specificity"]],
            [op["sensitivity"]],
            **_OP_STYLE,
            label=f"threshold {threshold:.3g}: sens {_fmt(op['sensitivity'])}, spec {_fmt(op['specificity'])}",
        )
    _unit_axes(ax, "False positive rate (1 - specificity)", "True positive rate (sensitivity)", title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_pr(
    y_true: Any,
    y_score: Any,
    path: str | os.PathLike[str],
    *,
    threshold: float | None = None,
    title: str = "Precision-recall curve",
) -> Path:
    """Precision-recall curve with AUPRC (average precision), the prevalence baseline and,
    if given, the operating point at ``threshold``."""
    pts = M.pr_points(y_true, y_score)
    y = np.asarray(y_true)
    ap = average_precision_score(y, np.asarray(y_score, dtype=float))
    prevalence = float(np.mean(y == 1))
    fig = _figure()
    ax = fig.add_subplot()
    ax.axhline(prevalence, linestyle="--", color="grey", linewidth=1, label=f"chance (prevalence = {prevalence:.3f})")
    ax.step(pts.recall, pts.precision, where="post", color="tab:blue", linewidth=2, label=f"model (AUPRC = {ap:.3f})")
    if threshold is not None:
        op = _operating_point(y_true, y_score, threshold)
        if op["ppv"] is not None:
            ax.plot(
                [op["sensitivity"]],
                [op["ppv"]],
                **_OP_STYLE,
                label=f"threshold {threshold:.3g}: sens {_fmt(op['sensitivity'])}, PPV {_fmt(op['ppv'])}",
            )
    _unit_axes(ax, "Recall (sensitivity)", "Precision (PPV)", title)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_confusion(
    cm: Any,
    classes: Sequence[Any],
    path: str | os.PathLike[str],
    *,
    title: str = "Confusion matrix",
) -> Path:
    """Confusion matrix (rows: true class, columns: predicted class) with counts and row %.

    ``cm`` is a (K, K) array-like or the binary ``{"tn", "fp", "fn", "tp"}`` dict of
    :func:`cxr.metrics.binary_metrics` (then ``classes`` is [negative name, positive name]).
    Colour shows the row-normalised fraction, so rare classes are as readable as common ones.
    """
    if isinstance(cm, Mapping):
        cm = [[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]]
    mat = np.asarray(cm)
    names = [str(c) for c in classes]
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"cm must be a square matrix, got shape {mat.shape}")
    if mat.shape[0] != len(names):
        raise ValueError(f"{len(names)} class names for a {mat.shape[0]}x{mat.shape[0]} matrix")
    if np.any(mat < 0) or not np.all(np.isfinite(mat)):
        raise ValueError("cm must hold non-negative finite counts")
    k = mat.shape[0]
    rows = mat.sum(axis=1, keepdims=True)
    frac = np.divide(mat, rows, out=np.zeros(mat.shape), where=rows > 0)
    side = max(FIGSIZE[0], 0.55 * k + 2.0)
    fig = _figure((side, side))
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    fontsize = 10 if k <= 4 else (8 if k <= 8 else 6)
    for i in range(k):
        for j in range(k):
            count = mat[i, j]
            text = f"{int(count)}" if float(count).is_integer() else f"{count:.3g}"
            if rows[i, 0] > 0:
                text += f"\n{100 * frac[i, j]:.0f}%"
            ax.text(
                j, i, text, ha="center", va="center", fontsize=fontsize, color="white" if frac[i, j] > 0.5 else "black"
            )
    rotate = k > 2 or max(len(n) for n in names) > 10
    ax.set_xticks(range(k), labels=names, rotation=45 if rotate else 0, ha="right" if rotate else "center", fontsize=9)
    ax.set_yticks(range(k), labels=names, fontsize=9)
    ax.set_xlabel("Predicted class", fontsize=10)
    ax.set_ylabel("True class", fontsize=10)
    ax.set_title(title, fontsize=11)
    return _save(fig, path)


def plot_calibration(
    y_true: Any,
    y_score: Any,
    path: str | os.PathLike[str],
    bins: int = 10,
    *,
    title: str = "Calibration (reliability diagram)",
) -> Path:
    """Reliability diagram over equal-width bins with the ECE and Brier score in the legend,
    and a histogram of the predicted probabilities underneath."""
    pts = M.calibration_points(y_true, y_score, bins)  # raises if scores are not probabilities
    ece = M.expected_calibration_error(y_true, y_score, bins)
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(y_score, dtype=float)
    brier = float(np.mean((p - y) ** 2))
    fig = _figure()
    grid = fig.add_gridspec(2, 1, height_ratios=[3, 1])
    ax = fig.add_subplot(grid[0])
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
    ax.plot(
        pts.mean_predicted,
        pts.fraction_positive,
        marker="o",
        color="tab:blue",
        linewidth=2,
        label=f"model (ECE = {ece:.3f}, Brier = {brier:.3f})",
    )
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_ylabel("Observed fraction positive", fontsize=10)
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.tick_params(labelbottom=False)
    hist = fig.add_subplot(grid[1], sharex=ax)
    hist.hist(p, bins=np.linspace(0, 1, bins + 1), color="tab:blue", alpha=0.7)
    hist.set_xlabel("Predicted probability", fontsize=10)
    hist.set_ylabel("Cases", fontsize=10)
    hist.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_roc_per_class(
    y_true: Any,
    scores: Any,
    classes: Sequence[Any],
    path: str | os.PathLike[str],
    *,
    title: str = "ROC curves (one vs rest)",
) -> Path:
    """One ROC curve per class, AUROC in the legend, for multiclass or multilabel results.

    ``y_true`` is either (N,) class indices (multiclass, one-vs-rest) or an (N, K) 0/1 matrix
    (multilabel). Classes with a single label value have no curve and are marked "n/a".
    """
    S = np.asarray(scores, dtype=float)
    if S.ndim != 2:
        raise ValueError(f"scores must have shape (N, K), got {S.shape}")
    n, k = S.shape
    names = [str(c) for c in classes]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} score columns")
    y = np.asarray(y_true)
    if y.ndim == 1 and y.shape[0] == n:
        Y = (y[:, None] == np.arange(k)[None, :]).astype(int)
    elif y.shape == (n, k):
        Y = y.astype(int)
    else:
        raise ValueError(f"y_true must have shape ({n},) or ({n}, {k}), got {y.shape}")
    side = FIGSIZE[0] if k <= 8 else 6.5
    fig = _figure((side, side))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    aucs = []
    for j, name in enumerate(names):
        col = Y[:, j]
        if 0 < col.sum() < n:
            pts = M.roc_points(col, S[:, j])
            auc = roc_auc_score(col, S[:, j])
            aucs.append(auc)
            ax.plot(pts.fpr, pts.tpr, color=cmap(j % cmap.N), linewidth=1.5, label=f"{name} (AUROC = {auc:.3f})")
        else:
            ax.plot([], [], linestyle="none", label=f"{name} (n/a: one label only)")
    if aucs:
        ax.plot([], [], linestyle="none", label=f"macro AUROC = {np.mean(aucs):.3f}")
    _unit_axes(ax, "False positive rate (1 - specificity)", "True positive rate (sensitivity)", title)
    ax.legend(loc="lower right", fontsize=8 if k <= 6 else 7)
    return _save(fig, path)


Scored = tuple[Any, Any]  # (labels 0/1, scores) of one set of films


def plot_reliability_shift(
    external: Scored, internal: Scored | None, path: str | os.PathLike[str], bins: int = 10
) -> Path:
    """Reliability diagrams of the internal test films and the external films on one axis: where the external
    curve runs below the internal one, the same score means less disease at the new site."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
    sets = [("internal test", internal, "tab:blue"), ("external", external, "tab:orange")]
    for name, scored, colour in sets:
        if scored is None:
            continue
        y, p = scored
        pts = M.calibration_points(y, p, bins)
        ece = M.expected_calibration_error(y, p, bins)
        ax.plot(pts.mean_predicted, pts.fraction_positive, marker="o", color=colour, label=f"{name} (ECE = {ece:.3f})")
    title = "Calibration: internal vs external" if internal is not None else "Calibration (internal: unavailable)"
    _unit_axes(ax, "Predicted probability", "Observed fraction positive", title)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_score_shift(
    external: Scored,
    internal: Scored | None,
    labels: Sequence[str],
    thresholds: Mapping[str, float],
    path: str | os.PathLike[str],
    bins: int = 20,
) -> Path:
    """Score histograms per true class, internal test vs external (density), with the thresholds as lines:
    negatives moving right past the model's threshold is a specificity drop."""
    fig = _figure((9.0, 4.0))
    edges = np.linspace(0, 1, bins + 1)
    styles = ("-", "--", ":", "-.")
    for k, label in enumerate(labels[:2]):
        ax = fig.add_subplot(1, 2, k + 1)
        for name, scored, colour in (("internal test", internal, "tab:blue"), ("external", external, "tab:orange")):
            if scored is None:
                continue
            y, p = (np.asarray(a, dtype=float) for a in scored)
            part = p[y == k]
            if part.size:
                ax.hist(part, bins=edges, density=True, alpha=0.5, color=colour, label=f"{name} (n={part.size})")
        for (name, t), style in zip(thresholds.items(), styles):
            ax.axvline(t, color="black", linestyle=style, linewidth=1, label=f"{name} threshold {t:.3f}")
        ax.set_xlim(0, 1)
        ax.set_xlabel("Score (probability of the positive label)", fontsize=10)
        ax.set_ylabel("Density", fontsize=10)
        ax.set_title(f"True {label}", fontsize=11)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)
