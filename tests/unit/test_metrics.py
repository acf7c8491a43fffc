"""Tests for cxr.evaluation.metrics: values agree with scikit-learn, intervals behave, edge cases are honest."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from scipy.special import expit, logit
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from cxr.evaluation import metrics as M
from cxr.evaluation.metrics.binary import weighted_binary_stats
from cxr.evaluation.metrics.bootstrap import rank_prep, resample_weights
from cxr.evaluation.metrics.multiclass import weighted_multiclass_stats

CI_METRICS = M.BINARY_METRICS


def _data(n: int, seed: int = 0, prevalence: float = 0.3, sep: float = 1.5, ties: bool = False):
    """Binary labels and probability scores of a moderately good, mildly miscalibrated model."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    s = 1.0 / (1.0 + np.exp(-(rng.normal(size=n) + sep * y - 0.8)))
    if ties:
        s = np.round(s, 2)
    return y, s


def _brute_sens_at_spec(y, s, spec):
    best = 0.0
    for t in np.append(np.unique(s), np.inf):
        pred = s >= t
        sp = np.mean(~pred[y == 0])
        if sp >= spec - 1e-12:
            best = max(best, np.mean(pred[y == 1]))
    return best


def _ece_loop(y, p, bins):
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for b in range(bins):
        lo, hi = edges[b], edges[b + 1]
        m = (p > lo) & (p <= hi) if b > 0 else (p >= lo) & (p <= hi)
        if m.any():
            total += m.sum() / len(p) * abs(y[m].mean() - p[m].mean())
    return total


# ---------------------------------------------------------------------------------------------
# Vectorised bootstrap kernel == scikit-learn on the resampled data
# ---------------------------------------------------------------------------------------------


def _kernel_reference(y, s, thr, bins=10):
    """Metrics of one data set computed directly with scikit-learn (and a loop for the ECE)."""
    pred = s >= thr
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    ref = {
        "auroc": roc_auc_score(y, s),
        "auprc": average_precision_score(y, s),
        "accuracy": accuracy_score(y, pred),
        "sensitivity": recall_score(y, pred),
        "specificity": recall_score(y, pred, pos_label=0),
        "ppv": precision_score(y, pred, zero_division=np.nan),
        "npv": precision_score(y, pred, pos_label=0, zero_division=np.nan),
        "f1": f1_score(y, pred),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "brier": brier_score_loss(y, s),
        "ece": _ece_loop(y, s, bins),
    }
    for spec in M.SPECIFICITY_TARGETS:
        ref[f"sens_at_spec_{spec:.2f}"] = _brute_sens_at_spec(y, s, spec)
    return ref


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_kernel_equals_sklearn_on_full_sample_and_resamples(ties):
    y, s = _data(300, seed=3, ties=ties)
    thr = 0.45
    rng = np.random.default_rng(7)
    idx_sets = [np.arange(len(y))] + [rng.integers(0, len(y), len(y)) for _ in range(4)]
    W = np.stack([np.bincount(idx, minlength=len(y)) for idx in idx_sets]).astype(float)
    got = weighted_binary_stats(y.astype(bool), s, thr, W, calibration_bins=10)
    for row, idx in enumerate(idx_sets):
        ref = _kernel_reference(y[idx], s[idx], thr)
        for key, value in ref.items():
            assert got[key][row] == pytest.approx(value, abs=1e-12), (key, row)


def test_weighted_kernel_marks_single_class_resamples_undefined():
    y, s = _data(100, seed=4)
    W = np.vstack([np.where(y == 0, 1.0, 0.0), np.where(y == 1, 2.0, 0.0)])  # negatives / positives only
    got = weighted_binary_stats(y.astype(bool), s, 0.5, W)
    for key in ("auroc", "auprc", "sens_at_spec_0.90", "sens_at_spec_0.95"):
        assert np.all(np.isnan(got[key])), key
    assert np.isnan(got["sensitivity"][0]) and np.isnan(got["specificity"][1])
    assert got["specificity"][0] == pytest.approx(np.mean(s[y == 0] < 0.5))


def test_weighted_multiclass_kernel_equals_sklearn_on_resamples():
    y, P = _multiclass_data(400, K=4, seed=5)
    pred = P.argmax(1)
    rng = np.random.default_rng(11)
    idx_sets = [np.arange(len(y))] + [rng.integers(0, len(y), len(y)) for _ in range(3)]
    W = np.stack([np.bincount(idx, minlength=len(y)) for idx in idx_sets]).astype(float)
    preps = {k: rank_prep(y == k, P[:, k]) for k in range(4)}
    got = weighted_multiclass_stats(y, pred, 4, W, preps)
    for row, idx in enumerate(idx_sets):
        yi, pi = y[idx], pred[idx]
        assert got["accuracy"][row] == pytest.approx(accuracy_score(yi, pi), abs=1e-12)
        assert got["balanced_accuracy"][row] == pytest.approx(balanced_accuracy_score(yi, pi), abs=1e-12)
        assert got["macro_f1"][row] == pytest.approx(f1_score(yi, pi, average="macro"), abs=1e-12)
        ovr = roc_auc_score(yi, P[idx], multi_class="ovr", average="macro")
        assert got["macro_auroc"][row] == pytest.approx(ovr, abs=1e-12)


def test_resample_weights_are_resamples_with_replacement():
    chunks = list(resample_weights(50, 1000, seed=1))
    W = np.vstack(chunks)
    assert W.shape == (1000, 50)
    assert np.all(W.sum(axis=1) == 50)
    assert np.all(W >= 0) and np.all(W == np.round(W))
    # Each case appears Binomial(50, 1/50) times: mean 1, variance 49/50.
    assert W.mean() == pytest.approx(1.0)
    assert W.var() == pytest.approx(49 / 50, rel=0.05)
    again = np.vstack(list(resample_weights(50, 1000, seed=1)))
    assert np.array_equal(W, again)
    fewer = np.vstack(list(resample_weights(50, 120, seed=1)))
    assert np.array_equal(W[:120], fewer)  # shared prefix, whatever the chunking
    big = np.vstack(list(resample_weights(30_001, 70, seed=1)))  # several chunks
    assert np.array_equal(big[:3], np.vstack(list(resample_weights(30_001, 3, seed=1))))


# ---------------------------------------------------------------------------------------------
# binary_metrics
# ---------------------------------------------------------------------------------------------


def test_binary_point_values_match_sklearn():
    y, s = _data(800, seed=1)
    thr = 0.5
    m = M.binary_metrics(y, s, thr, n_bootstrap=50)
    pred = s >= thr
    assert m["auroc"]["value"] == pytest.approx(roc_auc_score(y, s))
    assert m["auprc"]["value"] == pytest.approx(average_precision_score(y, s))
    assert m["accuracy"]["value"] == pytest.approx(accuracy_score(y, pred))
    assert m["sensitivity"]["value"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"]["value"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert m["ppv"]["value"] == pytest.approx(precision_score(y, pred))
    assert m["npv"]["value"] == pytest.approx(precision_score(y, pred, pos_label=0))
    assert m["f1"]["value"] == pytest.approx(f1_score(y, pred))
    assert m["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["brier"]["value"] == pytest.approx(brier_score_loss(y, s))
    assert m["ece"]["value"] == pytest.approx(_ece_loop(y, s, 10))
    for spec in M.SPECIFICITY_TARGETS:
        key = f"sens_at_spec_{spec:.2f}"
        assert m[key]["value"] == pytest.approx(_brute_sens_at_spec(y, s, spec))
    tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
    assert m["confusion"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert (m["n"], m["n_pos"], m["n_neg"]) == (800, int(y.sum()), int((y == 0).sum()))
    assert m["threshold"] == thr


def test_intervals_contain_the_point_estimate_and_are_ordered():
    y, s = _data(1500, seed=2)
    m = M.binary_metrics(y, s, 0.4, n_bootstrap=400, seed=4)
    for key in CI_METRICS:
        entry = m[key]
        assert entry["ci_low"] is not None and entry["ci_high"] is not None, key
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"], key
        assert entry["ci_low"] < entry["ci_high"], key


def test_interval_width_matches_binomial_theory_for_accuracy():
    # The bootstrap SE of a proportion is sqrt(p (1 - p) / n); the 95 % interval is ~ +-1.96 SE.
    y, s = _data(2000, seed=8)
    m = M.binary_metrics(y, s, 0.5, n_bootstrap=1000, seed=0)
    p = m["accuracy"]["value"]
    expected = 2 * 1.96 * math.sqrt(p * (1 - p) / 2000)
    width = m["accuracy"]["ci_high"] - m["accuracy"]["ci_low"]
    assert width == pytest.approx(expected, rel=0.15)


def test_intervals_narrow_as_n_grows():
    small = M.binary_metrics(*_data(200, seed=5), 0.5, n_bootstrap=300)
    large = M.binary_metrics(*_data(5000, seed=5), 0.5, n_bootstrap=300)
    for key in ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "brier"):
        w_small = small[key]["ci_high"] - small[key]["ci_low"]
        w_large = large[key]["ci_high"] - large[key]["ci_low"]
        assert w_large < w_small / 2, key  # sqrt(25) = 5x narrower in theory


def test_bootstrap_is_reproducible_and_seeded():
    y, s = _data(300, seed=6)
    a = M.binary_metrics(y, s, 0.5, n_bootstrap=200, seed=1)
    b = M.binary_metrics(y, s, 0.5, n_bootstrap=200, seed=1)
    c = M.binary_metrics(y, s, 0.5, n_bootstrap=200, seed=2)
    assert a == b
    assert a["auroc"]["value"] == c["auroc"]["value"]
    assert a["auroc"]["ci_low"] != c["auroc"]["ci_low"]


def test_no_bootstrap_gives_points_without_intervals():
    y, s = _data(100, seed=6)
    m = M.binary_metrics(y, s, 0.5, n_bootstrap=0)
    assert m["auroc"]["value"] == pytest.approx(roc_auc_score(y, s))
    assert all(m[k]["ci_low"] is None and m[k]["ci_high"] is None for k in CI_METRICS)


def test_metrics_are_computed_at_exactly_the_given_threshold():
    y, s = _data(600, seed=9)
    youden = M.choose_threshold(y, s)
    for thr in (0.2, float(np.sort(s)[300]), 0.8):  # the middle one is an observed score
        m = M.binary_metrics(y, s, thr, n_bootstrap=0)
        assert m["threshold"] == thr != youden
        pred = s >= thr
        assert m["sensitivity"]["value"] == pytest.approx(recall_score(y, pred))
        assert m["specificity"]["value"] == pytest.approx(recall_score(y, pred, pos_label=0))
        assert m["confusion"]["tp"] + m["confusion"]["fp"] == int(pred.sum())
    # A case whose score equals the threshold is predicted positive.
    m = M.binary_metrics([0, 1], [0.3, 0.6], 0.6, n_bootstrap=0)
    assert m["confusion"] == {"tn": 1, "fp": 0, "fn": 0, "tp": 1}
    m = M.binary_metrics([0, 1], [0.3, 0.6], 0.3, n_bootstrap=0)
    assert m["confusion"] == {"tn": 0, "fp": 1, "fn": 0, "tp": 1}


def test_perfect_classifier():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    s = np.where(y == 1, rng.uniform(0.6, 1.0, 200), rng.uniform(0.0, 0.4, 200))
    thr = M.choose_threshold(y, s, "youden")
    assert s[y == 1].min() >= thr > s[y == 0].max()
    m = M.binary_metrics(y, s, thr, n_bootstrap=200)
    for key in ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1"):
        assert m[key] == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}, key
    assert m["sens_at_spec_0.95"]["value"] == 1.0


def test_outputs_are_json_serialisable_without_nan():
    y, s = _data(200, seed=10)
    results = [
        M.binary_metrics(y, s, 0.5, n_bootstrap=100),
        M.binary_metrics(y, s, 2.0, n_bootstrap=100),  # nothing predicted positive: PPV undefined
        M.binary_metrics(np.zeros(30, int), s[:30], 0.5, n_bootstrap=100),  # one class
        M.binary_metrics(y, s * 10 - 5, 0.0, n_bootstrap=100),  # scores that are not probabilities
    ]
    for r in results:
        json.dumps(r, allow_nan=False)
    assert results[1]["ppv"] == {"value": None, "ci_low": None, "ci_high": None}
    assert results[1]["sensitivity"]["value"] == 0.0


def test_single_class_sample_reports_undefined_rank_metrics():
    s = np.linspace(0, 1, 40)
    m = M.binary_metrics(np.zeros(40, int), s, 0.5, n_bootstrap=100)
    for key in ("auroc", "auprc", "sensitivity", "sens_at_spec_0.90", "balanced_accuracy"):
        assert m[key] == {"value": None, "ci_low": None, "ci_high": None}, key
    assert m["ppv"]["value"] == 0.0  # cases were predicted positive, none of them correctly
    assert m["specificity"]["value"] == pytest.approx(np.mean(s < 0.5))
    assert m["n_pos"] == 0


def test_calibration_metrics_need_probabilities():
    y, s = _data(200, seed=12)
    logits = np.log(s / (1 - s))
    m = M.binary_metrics(y, logits, 0.0, n_bootstrap=50)
    assert m["brier"]["value"] is None and m["ece"]["value"] is None
    assert m["auroc"]["value"] == pytest.approx(roc_auc_score(y, s))  # rank metric unaffected
    assert m["accuracy"]["value"] == pytest.approx(accuracy_score(y, s >= 0.5))


@pytest.mark.parametrize(
    "y, s, match",
    [
        ([], [], "empty"),
        ([0, 1, 2], [0.1, 0.2, 0.3], "0/1"),
        ([0, 1], [0.1, np.nan], "NaN"),
        ([0, 1, 1], [0.1, 0.2], "3 labels"),
        ([[0, 1]], [[0.1, 0.2]], "one-dimensional"),
    ],
)
def test_invalid_inputs_raise(y, s, match):
    with pytest.raises(ValueError, match=match):
        M.binary_metrics(y, s, 0.5, n_bootstrap=10)


def test_invalid_threshold_and_bootstrap_settings_raise():
    y, s = _data(20, seed=1)
    with pytest.raises(ValueError, match="finite"):
        M.binary_metrics(y, s, float("nan"))
    with pytest.raises(ValueError, match="n_bootstrap"):
        M.binary_metrics(y, s, 0.5, n_bootstrap=-1)
    with pytest.raises(ValueError, match="ci"):
        M.binary_metrics(y, s, 0.5, ci=95)


def test_vectorised_bootstrap_is_fast():
    y, s = _data(5000, seed=13)
    start = time.perf_counter()
    M.binary_metrics(y, s, 0.5, n_bootstrap=1000)
    assert time.perf_counter() - start < 4.0  # ~0.3 s here; a per-resample sklearn loop takes >10 s


# ---------------------------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------------------------


def test_youden_threshold_maximises_j():
    y, s = _data(500, seed=14, ties=True)
    thr = M.choose_threshold(y, s, "youden")
    assert thr in set(s.tolist())

    def j(t):
        pred = s >= t
        return np.mean(pred[y == 1]) + np.mean(~pred[y == 0]) - 1

    best = max(j(t) for t in np.unique(s))
    assert j(thr) == pytest.approx(best)


def _binormal(rng, n_neg, n_pos):
    """Logits of negatives ~ N(-1.5, 1) and positives ~ N(1.5, 1): the population's Youden cut-off is 0."""
    y = np.r_[np.zeros(n_neg, int), np.ones(n_pos, int)]
    return y, np.where(y == 1, rng.normal(1.5, 1, y.size), rng.normal(-1.5, 1, y.size))


def test_kernel_youden_estimates_the_population_cut_off_with_less_spread_than_the_empirical_one():
    rng = np.random.default_rng(0)
    errors = {"youden": [], "youden_kernel": []}
    for _ in range(40):  # validation-sized samples: 60 negatives, 180 positives
        y, z = _binormal(rng, 60, 180)
        for method, errs in errors.items():
            errs.append(logit(M.choose_threshold(y, expit(z), method)))
    rms = {method: float(np.sqrt(np.mean(np.square(e)))) for method, e in errors.items()}
    assert rms["youden_kernel"] < 0.8 * rms["youden"]
    y, z = _binormal(rng, 3000, 3000)
    assert abs(logit(M.choose_threshold(y, expit(z), "youden_kernel"))) < 0.1
    # Scores that are not probabilities are smoothed as they are: the cut-off is in their units.
    assert abs(M.choose_threshold(y, 3 * z, "youden_kernel")) < 0.3


def test_kernel_youden_separates_separable_classes():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], [40, 120])
    s = np.where(y == 1, rng.uniform(0.6, 1.0, y.size), rng.uniform(0.0, 0.4, y.size))
    thr = M.choose_threshold(y, s, "youden_kernel")
    assert s[y == 1].min() >= thr > s[y == 0].max()


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 1.0])
def test_sensitivity_threshold_reaches_target_with_highest_threshold(target):
    y, s = _data(700, seed=15)
    thr = M.choose_threshold(y, s, "sensitivity", target_sensitivity=target)
    sens = np.mean(s[y == 1] >= thr)
    assert sens >= target
    higher = np.unique(s)[np.unique(s) > thr]
    if higher.size:  # the next higher score no longer reaches the target
        assert np.mean(s[y == 1] >= higher[0]) < target
    m = M.binary_metrics(y, s, thr, n_bootstrap=0)
    assert m["sensitivity"]["value"] >= target


def test_choose_threshold_rejects_degenerate_input():
    with pytest.raises(ValueError, match="both positive and negative"):
        M.choose_threshold([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(ValueError, match="both positive and negative"):
        M.choose_threshold([0, 0], [0.2, 0.5], "sensitivity")
    with pytest.raises(ValueError, match="unknown method"):
        M.choose_threshold([0, 1], [0.2, 0.5], "f1")
    with pytest.raises(ValueError, match="target_sensitivity"):
        M.choose_threshold([0, 1], [0.2, 0.5], "sensitivity", target_sensitivity=1.5)


# ---------------------------------------------------------------------------------------------
# Curve points and calibration
# ---------------------------------------------------------------------------------------------


def test_curve_points_match_sklearn():
    y, s = _data(300, seed=16)
    fpr, tpr, thr = roc_curve(y, s)
    pts = M.roc_points(y, s)
    assert np.array_equal(pts.fpr, fpr) and np.array_equal(pts.tpr, tpr)
    prec, rec, _ = precision_recall_curve(y, s)
    pr = M.pr_points(y, s)
    assert np.array_equal(pr.precision, prec) and np.array_equal(pr.recall, rec)
    with pytest.raises(ValueError):
        M.roc_points([0, 0], [0.1, 0.2])


def test_calibration_points_match_sklearn_and_ece_is_zero_when_calibrated():
    y, s = _data(1000, seed=17)
    cp = M.calibration_points(y, s, n_bins=8)
    prob_true, prob_pred = calibration_curve(y, s, n_bins=8, strategy="uniform")
    assert np.allclose(cp.fraction_positive, prob_true) and np.allclose(cp.mean_predicted, prob_pred)
    assert cp.count.sum() == 1000
    # Every bin's mean probability equals its fraction of positives -> ECE is exactly 0.
    y_cal = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    p_cal = np.array([0.25] * 4 + [0.75] * 4)
    assert M.expected_calibration_error(y_cal, p_cal, 10) == pytest.approx(0.0, abs=1e-15)
    # All predictions 1.0 while all negatives -> ECE is 1.
    assert M.expected_calibration_error([0, 0], [1.0, 1.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="probabilities"):
        M.calibration_points([0, 1], [-0.5, 2.0])


# ---------------------------------------------------------------------------------------------
# Multiclass
# ---------------------------------------------------------------------------------------------


def _multiclass_data(n, K=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    logits = rng.normal(size=(n, K)) + 1.5 * np.eye(K)[y]
    P = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, P


def test_multiclass_matches_sklearn():
    classes = ["Normal", "COVID", "Lung_Opacity", "Viral Pneumonia"]
    y, P = _multiclass_data(600, K=4, seed=1)
    m = M.multiclass_metrics(y, P, classes, n_bootstrap=200, seed=0)
    pred = P.argmax(1)
    assert m["accuracy"]["value"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"]["value"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["macro_auroc"]["value"] == pytest.approx(roc_auc_score(y, P, multi_class="ovr", average="macro"))
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    recalls = recall_score(y, pred, average=None)
    precisions = precision_score(y, pred, average=None)
    f1s = f1_score(y, pred, average=None)
    for k, name in enumerate(classes):
        pc = m["per_class"][name]
        assert pc["sensitivity"] == pytest.approx(recalls[k])
        assert pc["ppv"] == pytest.approx(precisions[k])
        assert pc["f1"] == pytest.approx(f1s[k])
        assert pc["specificity"] == pytest.approx(recall_score(y == k, pred == k, pos_label=0))
        assert pc["auroc"] == pytest.approx(roc_auc_score(y == k, P[:, k]))
        assert pc["auprc"] == pytest.approx(average_precision_score(y == k, P[:, k]))
        assert pc["support"] == int((y == k).sum())
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc"):
        assert m[key]["ci_low"] <= m[key]["value"] <= m[key]["ci_high"], key
    assert m["classes"] == classes and len(m["confusion_matrix"]) == 4
    json.dumps(m, allow_nan=False)


def test_multiclass_with_a_class_absent_from_the_truth():
    y, P = _multiclass_data(200, K=3, seed=2)
    y = np.where(y == 2, 0, y)  # class 2 never true
    m = M.multiclass_metrics(y, P, ["a", "b", "c"], n_bootstrap=50)
    assert m["per_class"]["c"]["auroc"] is None and m["per_class"]["c"]["support"] == 0
    assert m["macro_auroc_classes"] == ["a", "b"]
    expected = np.mean([roc_auc_score(y == k, P[:, k]) for k in (0, 1)])
    assert m["macro_auroc"]["value"] == pytest.approx(expected)
    json.dumps(m, allow_nan=False)


def test_multiclass_rejects_bad_shapes():
    y, P = _multiclass_data(20, K=3)
    with pytest.raises(ValueError, match="class names"):
        M.multiclass_metrics(y, P, ["a", "b"], n_bootstrap=0)
    with pytest.raises(ValueError, match="shape"):
        M.multiclass_metrics(y[:-1], P, ["a", "b", "c"], n_bootstrap=0)
    with pytest.raises(ValueError, match="class indices"):
        M.multiclass_metrics(np.full(20, 3), P, ["a", "b", "c"], n_bootstrap=0)


# ---------------------------------------------------------------------------------------------
# Multilabel
# ---------------------------------------------------------------------------------------------


def test_multilabel_per_class_and_macro():
    rng = np.random.default_rng(3)
    n, K = 400, 4
    Y = (rng.random((n, K)) < [0.1, 0.3, 0.5, 0.2]).astype(int)
    Y[:, 3] = 0  # a finding absent from this sample
    P = 1 / (1 + np.exp(-(rng.normal(size=(n, K)) + 1.5 * Y - 1)))
    thresholds = [0.3, 0.4, 0.5, 0.6]
    classes = ["Atelectasis", "Effusion", "Infiltration", "Hernia"]
    m = M.multilabel_metrics(Y, P, classes, thresholds, n_bootstrap=200, per_class_bootstrap=50)
    assert set(m["per_class"]) == set(classes)
    for k, name in enumerate(classes):
        pc = m["per_class"][name]
        assert pc["threshold"] == thresholds[k]
        assert pc["confusion"]["tp"] + pc["confusion"]["fp"] == int((P[:, k] >= thresholds[k]).sum())
        assert pc["bootstrap"]["n_resamples"] == 50
    assert m["per_class"]["Hernia"]["auroc"]["value"] is None
    assert m["excluded_from_macro"] == ["Hernia"]
    assert m["macro_auroc"]["value"] == pytest.approx(np.mean([roc_auc_score(Y[:, k], P[:, k]) for k in range(3)]))
    assert m["macro_auprc"]["value"] == pytest.approx(
        np.mean([average_precision_score(Y[:, k], P[:, k]) for k in range(3)])
    )
    for key in ("macro_auroc", "macro_auprc"):
        assert m[key]["ci_low"] <= m[key]["value"] <= m[key]["ci_high"]
    json.dumps(m, allow_nan=False)


def test_multilabel_all_columns_single_label_does_not_crash():
    Y = np.zeros((30, 2), int)
    P = np.full((30, 2), 0.2)
    m = M.multilabel_metrics(Y, P, ["a", "b"], [0.5, 0.5], n_bootstrap=20)
    assert m["macro_auroc"]["value"] is None and m["macro_classes"] == []
    json.dumps(m, allow_nan=False)


def test_multilabel_rejects_bad_shapes():
    Y = np.zeros((10, 3), int)
    P = np.zeros((10, 3))
    with pytest.raises(ValueError, match="thresholds"):
        M.multilabel_metrics(Y, P, ["a", "b", "c"], [0.5, 0.5], n_bootstrap=0)
    with pytest.raises(ValueError, match="columns"):
        M.multilabel_metrics(Y, P[:, :2], ["a", "b", "c"], [0.5] * 3, n_bootstrap=0)


# ---------------------------------------------------------------------------------------------
# Subgroups, age bands, headline
# ---------------------------------------------------------------------------------------------


def test_subgroups_use_the_fixed_threshold_and_skip_small_groups():
    y, s = _data(300, seed=18)
    view = np.array(["PA"] * 150 + ["AP"] * 140 + ["LL"] * 10)
    sex = np.array(["F", "M"] * 149 + [None, float("nan")], dtype=object)
    out = M.subgroup_metrics(y, s, 0.45, {"view": view, "sex": sex}, min_size=20, n_bootstrap=50, seed=3)
    assert set(out) == {"view", "sex"}
    assert out["view"]["LL"] == {"skipped": True, "n": 10, "reason": "fewer than 20 cases"}
    assert out["sex"]["unknown"]["skipped"] and out["sex"]["unknown"]["n"] == 2
    pa = out["view"]["PA"]
    assert pa == M.binary_metrics(y[:150], s[:150], 0.45, n_bootstrap=50, seed=3)
    assert pa["threshold"] == 0.45 and out["view"]["AP"]["n"] == 140
    json.dumps(out, allow_nan=False)
    with pytest.raises(ValueError, match="labels"):
        M.subgroup_metrics(y, s, 0.5, {"view": view[:-1]})


@pytest.mark.parametrize(
    "age, band",
    [
        (0, "0-17"),
        (17.9, "0-17"),
        (18, "18-39"),
        (39.5, "18-39"),
        (40, "40-59"),
        (59, "40-59"),
        (60, "60-79"),
        (79.99, "60-79"),
        (80, "80+"),
        (104, "80+"),
        ("045Y", "40-59"),
        ("006M", "0-17"),
        ("018Y", "18-39"),
        ("63", "60-79"),
        (None, "unknown"),
        (float("nan"), "unknown"),
        (-1, "unknown"),
        (414, "unknown"),
        ("abc", "unknown"),
        ("", "unknown"),
        (True, "unknown"),
    ],
)
def test_age_band(age, band):
    assert M.age_band(age) == band


def test_headline_is_flat_and_omits_undefined_values():
    y, s = _data(200, seed=19)
    m = M.binary_metrics(y, s, 2.0, n_bootstrap=20)  # PPV undefined
    h = M.headline(m)
    assert "ppv" not in h
    assert h["auroc"] == m["auroc"]["value"] and h["accuracy"] == m["accuracy"]["value"]
    assert set(h) == {k for k in CI_METRICS if m[k]["value"] is not None}
    assert all(isinstance(v, float) for v in h.values())
    yc, P = _multiclass_data(100, K=3, seed=1)
    mc = M.multiclass_metrics(yc, P, ["Normal", "COVID", "Viral Pneumonia"], n_bootstrap=0)
    hc = M.headline(mc, prefix="test_", per_class=True)
    assert hc["test_accuracy"] == mc["accuracy"]["value"]
    assert hc["test_auroc/Viral_Pneumonia"] == mc["per_class"]["Viral Pneumonia"]["auroc"]
