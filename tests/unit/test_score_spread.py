"""score_spread: what the promotion gate reads to tell a model that ranks cases from a near-constant one."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cxr.evaluation.evaluate import score_spread
from cxr.task import Task


def task(name: str, threshold=0.5):
    return SimpleNamespace(task=Task(name), labels=["a", "b", "c"], threshold=threshold)


def test_binary_near_constant_scores_at_their_threshold():
    probs = np.array([0.409, 0.410, 0.411, 0.412])  # the incident: every patient ~0.41, threshold right there
    spread = score_spread(task("binary", 0.4105), probs)
    assert spread["std"] == pytest.approx(probs.std()) and spread["std"] < 0.01
    assert spread["distinct_predictions"] == 2 and spread["predicted_positive_share"] == 0.5


def test_binary_single_predicted_class():
    spread = score_spread(task("binary", 0.3), np.array([0.35, 0.9, 0.6]))
    assert spread["distinct_predictions"] == 1 and spread["predicted_positive_share"] == 1.0


def test_multiclass_counts_argmax_classes_and_takes_the_widest_column():
    probs = np.array([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.6, 0.3, 0.1]])
    spread = score_spread(task("multiclass", None), probs)
    assert spread["distinct_predictions"] == 1 and "predicted_positive_share" not in spread
    assert spread["std"] == pytest.approx(probs[:, 0].std())


def test_multilabel_counts_distinct_label_sets_at_per_label_thresholds():
    probs = np.array([[0.9, 0.1, 0.5], [0.9, 0.6, 0.5], [0.2, 0.6, 0.5]])
    assert score_spread(task("multilabel", [0.5, 0.5, 0.5]), probs)["distinct_predictions"] == 3
    assert score_spread(task("multilabel", [0.1, 0.05, 0.4]), probs)["distinct_predictions"] == 1
