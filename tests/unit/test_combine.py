"""Cross-architecture ensembles (cxr.training.combine): the weights minimise validation log loss, and models that
answer another question or were trained on other data are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr.models import build_model
from cxr.models.predictor import Predictor
from cxr.training.combine import EnsembleMismatch, check_members, choose_weights, log_loss
from support.tiny_model import tiny_card


def _validation(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    informative = (2 * y - 1) * 1.5 + rng.normal(0, 1, n)  # separates the classes
    noise = rng.normal(0, 2, n)  # says nothing about them, confidently
    return np.stack([informative, noise])[:, :, None], y


def test_the_informative_member_gets_the_weight_and_the_loss_is_no_worse_than_equal_weights() -> None:
    logits, y = _validation()
    weights = choose_weights(logits, y, "binary")
    assert weights.sum() == pytest.approx(1) and np.all(weights >= 0)
    assert weights[0] > 0.9
    chosen = log_loss(np.tensordot(weights, logits, 1), y, "binary")
    assert chosen <= log_loss(logits.mean(0), y, "binary")
    assert chosen <= min(log_loss(m, y, "binary") for m in logits) + 1e-6
    swapped = choose_weights(logits[::-1].copy(), y, "binary")  # the order of the members does not matter
    np.testing.assert_allclose(swapped[::-1], weights, atol=1e-3)


def test_multiclass_weights_use_the_softmax_log_loss() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    good = np.eye(3)[y] * 3 + rng.normal(0, 1, (300, 3))
    weights = choose_weights(np.stack([good, rng.normal(0, 3, (300, 3))]), y, "multiclass")
    assert weights[0] > 0.9


def _member(task: str = "binary", labels=("normal", "pneumonia"), dataset: str = "test", size: int = 32) -> Predictor:
    outputs = 1 if task == "binary" else len(labels)
    model = build_model("simple_cnn", outputs, width=8)
    card = tiny_card(model.spec, size, task, labels)
    return Predictor(model, card.with_run(dataset_hash=dataset))


class _Data:
    root = "data/prepared"
    card = {"dataset_hash": "test"}


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (lambda: _member("multiclass", ("normal", "bacterial", "viral")), "has task 'multiclass'"),
        (lambda: _member(labels=("no finding", "pneumonia")), "has labels"),
        (lambda: _member(dataset="another"), "trained on other data"),
    ],
)
def test_models_that_do_not_fit_together_are_refused_with_the_reason(other, message) -> None:
    torch.manual_seed(0)
    check_members([_member(), _member(size=64)], ["a", "b"], _Data())  # other sizes fit together
    with pytest.raises(EnsembleMismatch, match=message):
        check_members([_member(), other()], ["a", "b"], _Data())
