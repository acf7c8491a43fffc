"""The random-forest baseline's torch twin answers as scikit-learn's forest does, and is saved without pickle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.ensemble import RandomForestClassifier

from cxr.models.build import build_from_spec
from cxr.models.forest import ForestBaseline, _floor_float32
from cxr.models.predictor import Predictor
from cxr.training.baseline import pixel_features
from support.tiny_model import tiny_card

LABELS = {"binary": ("normal", "pneumonia"), "multiclass": ("a", "b", "c"), "multilabel": ("a", "b", "never")}


def films(n: int = 240, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def targets(x: np.ndarray, task: str) -> np.ndarray:
    if task == "binary":
        return (x[:, 0] + x[:, 7] > 1).astype(np.int64)
    if task == "multiclass":
        return np.digitize(x[:, 3], [0.47, 0.53])
    return np.c_[x[:, 0] > 0.5, x[:, 9] > 0.5, np.zeros(len(x))].astype(np.int64)  # "never": one class only


def sklearn_probs(forest: RandomForestClassifier, x: np.ndarray, task: str) -> np.ndarray:
    proba = forest.predict_proba(x)
    if task == "binary":
        return proba[:, 1]
    if task == "multiclass":
        return proba
    return np.stack([p[:, 1] if p.shape[1] == 2 else np.zeros(len(p)) for p in proba], axis=1)


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_the_twin_saved_and_loaded_equals_sklearn_predict_proba(tmp_path, task):
    images = films()
    x = pixel_features(images)
    forest = RandomForestClassifier(40, min_samples_leaf=2, class_weight="balanced", random_state=0)
    forest.fit(x[:160], targets(x[:160], task))
    n_outputs = 1 if task == "binary" else 3
    model = ForestBaseline.from_sklearn(forest, n_outputs, softmax=task == "multiclass")
    Predictor(model, tiny_card(model.spec, 32, task, LABELS[task])).save(tmp_path / "model")

    loaded = Predictor.from_dir(tmp_path / "model")
    got = loaded.predict_proba(images, batch_size=64)
    assert loaded.card.arch == "random_forest" and loaded.card.ood is None
    assert np.abs(got - sklearn_probs(forest, x, task)).max() <= 1e-6


def test_spec_rebuilds_the_same_shapes():
    forest = RandomForestClassifier(3, max_depth=2, random_state=0).fit(np.eye(4, dtype=np.float32), [0, 1, 0, 1])
    model = ForestBaseline.from_sklearn(forest, 1, softmax=False)
    rebuilt = build_from_spec(model.spec)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert rebuilt.spec == model.spec


def test_a_split_between_neighbouring_float32_values_is_kept():
    """scikit-learn splits halfway between two float32 values, in float64; rounded to the nearer float32 the
    threshold can land on the upper value and send it left. The twin rounds down."""
    a = np.nextafter(np.float32(2.5), np.float32(4))  # odd last bit: the halfway tie rounds up, to b
    b = np.nextafter(a, np.float32(4))  # one ulp (2.4e-7) above: far enough apart for scikit-learn to split
    t = (np.float64(a) + np.float64(b)) / 2
    assert np.float32(t) == b and _floor_float32(np.array([t]))[0] == a
    x = np.array([[a], [b]] * 8, dtype=np.float32)
    forest = RandomForestClassifier(1, bootstrap=False, random_state=0).fit(x, [0, 1] * 8)
    model = ForestBaseline.from_sklearn(forest, 1, softmax=False)
    positive = model.value[model.leaves(torch.from_numpy(x[:2]))].mean(dim=1)[:, 0]
    assert positive.tolist() == [0.0, 1.0] == forest.predict_proba(x[:2])[:, 1].tolist()
