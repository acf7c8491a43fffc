"""The bootstrap engine: integer case weights per resample, rank counts behind AUROC / AP, percentile intervals."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import sparse

from cxr.evaluation.metrics.checks import RATE_TOL, finite_or_none, safe_div

#: A bootstrap interval is reported only when at least this fraction of resamples defines it.
MIN_VALID_BOOTSTRAP_FRACTION = 0.5


# Case-weight matrices are generated in chunks of at most this many entries (memory bound).
_CHUNK_ELEMENTS = 1_000_000


def resample_weights(n: int, n_bootstrap: int, seed: int) -> Iterator[np.ndarray]:
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


class RankPrep(NamedTuple):
    """Maps each case to a score segment, so one sparse product gives all per-resample sums.

    With ``u_0 > u_1 > ... > u_{G-1}`` the distinct scores of the positive cases, segment
    ``3g`` holds the negatives scored strictly between ``u_{g-1}`` and ``u_g``, ``3g + 1`` the
    negatives tied at ``u_g``, ``3g + 2`` the positives at ``u_g`` and ``3G`` the negatives
    below ``u_{G-1}``. The ROC points that matter for AUROC, AP and sensitivity-at-specificity
    are the thresholds ``u_g`` (any other threshold is dominated by one of them).
    """

    segments: sparse.csr_matrix  # (n, 3G + 1) 0/1 case -> segment
    n_groups: int


def rank_prep(y: np.ndarray, s: np.ndarray) -> RankPrep:
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
    return RankPrep(mat, G)


class RankCounts(NamedTuple):
    pos_at: np.ndarray  # (c, G) weighted positives scored exactly u_g
    tp: np.ndarray  # (c, G) weighted positives scored >= u_g
    fp: np.ndarray  # (c, G) weighted negatives scored >= u_g
    neg_tie: np.ndarray  # (c, G) weighted negatives scored exactly u_g
    P: np.ndarray  # (c,)
    N: np.ndarray  # (c,)


def rank_counts(prep: RankPrep, W: np.ndarray) -> RankCounts:
    sums = np.asarray(W @ prep.segments)
    G = prep.n_groups
    neg_between, neg_tie, pos_at = sums[:, 0 : 3 * G : 3], sums[:, 1 : 3 * G : 3], sums[:, 2 : 3 * G : 3]
    fp = np.cumsum(neg_between + neg_tie, axis=1)
    tp = np.cumsum(pos_at, axis=1)
    P = tp[:, -1] if G else np.zeros(W.shape[0])
    N = (fp[:, -1] if G else 0.0) + sums[:, 3 * G]
    return RankCounts(pos_at, tp, fp, neg_tie, P, N)


def auroc_from_counts(rc: RankCounts) -> np.ndarray:
    # Mann-Whitney: P(score_pos > score_neg) + P(tie) / 2 over all weighted pairs.
    below = rc.N[:, None] - rc.fp  # negatives strictly below u_g
    u = np.sum(rc.pos_at * (below + 0.5 * rc.neg_tie), axis=1)
    return safe_div(u, rc.P * rc.N)


def ap_from_counts(rc: RankCounts) -> np.ndarray:
    # sklearn's average precision: sum over thresholds of (R_k - R_{k-1}) * precision_k; only
    # thresholds that add positives (the u_g) have R_k > R_{k-1}.
    precision = np.nan_to_num(safe_div(rc.tp, rc.tp + rc.fp))  # 0/0 only where pos_at == 0
    ap = safe_div(np.sum(rc.pos_at * precision, axis=1), rc.P)
    ap[rc.N == 0] = np.nan  # one class: undefined, as for the point estimate
    return ap


def sens_at_spec_from_counts(rc: RankCounts, spec: float) -> np.ndarray:
    N = rc.N[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = (N - rc.fp) / N >= spec - RATE_TOL
    best = np.max(np.where(ok, rc.tp, 0.0), axis=1, initial=0.0)  # (0, 0) always qualifies
    out = safe_div(best, rc.P)
    out[rc.N == 0] = np.nan
    return out


def _percentile_ci(samples: np.ndarray, ci: float, n_bootstrap: int) -> tuple[Any, Any]:
    valid = samples[np.isfinite(samples)]
    if n_bootstrap == 0 or valid.size < max(2, math.ceil(MIN_VALID_BOOTSTRAP_FRACTION * n_bootstrap)):
        return None, None
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.percentile(valid, [100 * alpha, 100 * (1 - alpha)])
    return finite_or_none(lo), finite_or_none(hi)


def with_ci(value: Any, samples: np.ndarray | None, ci: float, n_bootstrap: int) -> dict:
    value = finite_or_none(value)
    if value is None or samples is None:
        return {"value": value, "ci_low": None, "ci_high": None}
    lo, hi = _percentile_ci(samples, ci, n_bootstrap)
    return {"value": value, "ci_low": lo, "ci_high": hi}


def collect(chunks: list[dict[str, np.ndarray]], keys: Sequence[str]) -> dict[str, np.ndarray]:
    if not chunks:
        return {k: np.empty(0) for k in keys}
    return {k: np.concatenate([c[k] for c in chunks]) for k in keys}


def bootstrap_meta(n_bootstrap: int, ci: float, seed: int) -> dict[str, Any]:
    return {
        "n_resamples": int(n_bootstrap),
        "ci": float(ci),
        "seed": int(seed),
        "method": "percentile bootstrap over cases",
        "min_valid_fraction": MIN_VALID_BOOTSTRAP_FRACTION,
    }
