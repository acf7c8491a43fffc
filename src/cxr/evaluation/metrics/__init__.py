"""Evaluation math: thresholds, point metrics with bootstrap confidence intervals, subgroups; one module per job.

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

from cxr.evaluation.metrics.binary import BINARY_METRICS, SPECIFICITY_TARGETS, binary_metrics
from cxr.evaluation.metrics.curves import (
    CalibrationPoints,
    PrPoints,
    RocPoints,
    calibration_points,
    expected_calibration_error,
    pr_points,
    roc_points,
)
from cxr.evaluation.metrics.headline import headline
from cxr.evaluation.metrics.multiclass import multiclass_metrics
from cxr.evaluation.metrics.multilabel import multilabel_metrics
from cxr.evaluation.metrics.subgroups import age_band, subgroup_metrics
from cxr.evaluation.metrics.thresholds import choose_threshold, confusion_at

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
