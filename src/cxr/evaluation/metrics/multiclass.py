"""Single-label K-class metrics (arg-max prediction), macro summaries with bootstrap intervals."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from cxr.evaluation.metrics.bootstrap import (
    RankPrep,
    auroc_from_counts,
    bootstrap_meta,
    collect,
    rank_counts,
    rank_prep,
    resample_weights,
    with_ci,
)
from cxr.evaluation.metrics.checks import (
    check_bootstrap,
    class_names,
    confusion_ratios,
    json_safe,
    safe_div,
    score_matrix,
)


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
    y, P, names = _class_indices_and_scores(y_true, probs, classes)
    check_bootstrap(n_bootstrap, ci)
    n, K = y.size, P.shape[1]
    pred = P.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=list(range(K)))
    per_class, macro_set = _one_vs_rest(y, P, cm, names)
    point = {
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": _balanced_accuracy_point(y, pred),
        "macro_f1": f1_score(y, pred, average="macro", zero_division=np.nan),
        "macro_auroc": (float(np.mean([per_class[names[k]]["auroc"] for k in macro_set])) if macro_set else None),
    }

    preps = {k: rank_prep(y == k, P[:, k]) for k in macro_set}
    chunks = [weighted_multiclass_stats(y, pred, K, W, preps) for W in resample_weights(n, n_bootstrap, seed)]
    boot = collect(chunks, list(point))
    out: dict[str, Any] = {k: with_ci(v, boot[k], ci, n_bootstrap) for k, v in point.items()}
    out.update(
        n=n,
        classes=names,
        per_class=per_class,
        confusion_matrix=cm.tolist(),
        confusion_matrix_axes="rows: true class, columns: predicted class",
        macro_auroc_classes=[names[k] for k in macro_set],
        bootstrap=bootstrap_meta(n_bootstrap, ci, seed),
    )
    return json_safe(out)


def _class_indices_and_scores(
    y_true: Any, probs: Any, classes: Sequence[Any]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Integer class indices (N,), scores (N, K) and K class names, checked against each other."""
    y = np.asarray(y_true)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"y_true must be a non-empty 1-D array of class indices, got {y.shape}")
    P = score_matrix(probs, y.size, "probs")
    K = P.shape[1]
    names = class_names(classes, K)
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.number) and np.all(y == np.round(y))):
            raise ValueError("y_true must hold integer class indices")
        y = y.astype(int)
    if y.min() < 0 or y.max() >= K:
        raise ValueError(f"y_true class indices must be in [0, {K}), found {y.min()}..{y.max()}")
    return y, P, names


def _one_vs_rest(
    y: np.ndarray, P: np.ndarray, cm: np.ndarray, names: list[str]
) -> tuple[dict[str, dict[str, Any]], list[int]]:
    """Each class against the rest (no CI), and the classes with both labels that the macro AUROC averages."""
    n = y.size
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
        r = confusion_ratios(tn, fp, fn, tp)
        per_class[name] = {
            "auroc": roc_auc_score(yk, P[:, k]) if both else None,
            "auprc": average_precision_score(yk, P[:, k]) if both else None,
            "sensitivity": r["sensitivity"].item(),
            "specificity": r["specificity"].item(),
            "ppv": r["ppv"].item(),
            "f1": r["f1"].item(),
            "support": int(yk.sum()),
        }
    return per_class, macro_set


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
    return safe_div(tot, cnt)


def weighted_multiclass_stats(
    y: np.ndarray, pred: np.ndarray, K: int, W: np.ndarray, preps: Mapping[int, RankPrep]
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
    recall = safe_div(diag, rows)  # NaN for classes absent from the resample's truth
    f1 = safe_div(2 * diag, rows + cols)  # NaN for classes neither true nor predicted
    aucs = [auroc_from_counts(rank_counts(prep, W)) for prep in preps.values()]
    return {
        "accuracy": diag.sum(axis=1) / W.sum(axis=1),
        "balanced_accuracy": _nanmean_rows(recall),
        "macro_f1": _nanmean_rows(f1),
        "macro_auroc": np.mean(aucs, axis=0) if aucs else np.full(W.shape[0], np.nan),
    }
