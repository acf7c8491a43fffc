"""Multi-label metrics: each finding a binary task at its own threshold, macro AUROC / AUPRC with intervals."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cxr.evaluation.metrics.binary import binary_metrics
from cxr.evaluation.metrics.bootstrap import (
    ap_from_counts,
    auroc_from_counts,
    bootstrap_meta,
    collect,
    rank_counts,
    rank_prep,
    resample_weights,
    with_ci,
)
from cxr.evaluation.metrics.checks import binary_labels, check_bootstrap, class_names, json_safe, score_matrix


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
    cols, S, names, thr = _labels_scores_thresholds(Y, P, classes, thresholds)
    check_bootstrap(n_bootstrap, ci)
    n, K = S.shape
    pcb = n_bootstrap if per_class_bootstrap is None else per_class_bootstrap

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
    chunks = _macro_resamples(cols, S, macro_set, n_bootstrap, seed)
    boot = collect(chunks, list(point))
    out: dict[str, Any] = {k: with_ci(v, boot[k] if macro_set else None, ci, n_bootstrap) for k, v in point.items()}
    out.update(
        n=n,
        classes=names,
        thresholds=thr.tolist(),
        per_class=per_class,
        macro_classes=[names[k] for k in macro_set],
        excluded_from_macro=[names[k] for k in range(K) if k not in macro_set],
        bootstrap=bootstrap_meta(n_bootstrap, ci, seed),
    )
    return json_safe(out)


def _labels_scores_thresholds(
    Y: Any, P: Any, classes: Sequence[Any], thresholds: Any
) -> tuple[list[np.ndarray], np.ndarray, list[str], np.ndarray]:
    """Each finding's 0/1 labels, the scores (N, K), K class names and K thresholds, checked against each other."""
    Yarr = np.asarray(Y)
    if Yarr.ndim != 2 or Yarr.shape[0] == 0:
        raise ValueError(f"Y must have shape (N, K) with N > 0, got {Yarr.shape}")
    n, K = Yarr.shape
    S = score_matrix(P, n, "P")
    if S.shape[1] != K:
        raise ValueError(f"Y has {K} columns but P has {S.shape[1]}")
    names = class_names(classes, K)
    thr = np.asarray(thresholds, dtype=float).reshape(-1)
    if thr.shape != (K,):
        raise ValueError(f"thresholds must have {K} values, got {thr.shape[0]}")
    return [binary_labels(Yarr[:, k], f"Y[:, {k}]") for k in range(K)], S, names, thr


def _macro_resamples(
    cols: list[np.ndarray], S: np.ndarray, macro_set: list[int], n_bootstrap: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """The macro AUROC and AUPRC of every resample, the classes sharing each resample (label correlation kept)."""
    if not macro_set:
        return []
    preps = {k: rank_prep(cols[k], S[:, k]) for k in macro_set}
    chunks = []
    for W in resample_weights(S.shape[0], n_bootstrap, seed):
        aucs, aps = [], []
        for k in macro_set:
            rc = rank_counts(preps[k], W)
            aucs.append(auroc_from_counts(rc))
            aps.append(ap_from_counts(rc))
        chunks.append({"macro_auroc": np.mean(aucs, axis=0), "macro_auprc": np.mean(aps, axis=0)})
    return chunks
