"""Task: what binary, multiclass and multilabel mean for outputs, activation and labels, in one place; cards and
JSON keep the task's name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cxr.task import Task
from support.tiny_model import tiny_card


def test_the_name_is_the_schema_and_a_card_keeps_it() -> None:
    assert Task("multilabel") is Task.MULTILABEL and Task.BINARY == "binary" and f"{Task.MULTICLASS}" == "multiclass"
    card = tiny_card({"arch": "simple_cnn"}, task="multilabel", labels=("a", "b"))
    assert card.task is Task.MULTILABEL and json.loads(card.to_json())["task"] == "multilabel"
    with pytest.raises(ValueError):
        Task("regression")


def test_outputs_activation_and_shape_follow_the_task() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
    assert torch.allclose(Task.MULTICLASS.activate(logits).sum(dim=1), torch.ones(2))  # one class per film
    assert torch.equal(Task.MULTILABEL.activate(logits), torch.sigmoid(logits))  # each finding on its own
    np.testing.assert_allclose(Task.MULTICLASS.activate_array(logits.numpy()), Task.MULTICLASS.activate(logits))
    assert Task.BINARY.squeeze(np.zeros((4, 1))).shape == (4,) and Task.MULTILABEL.squeeze(np.zeros((4, 3))).shape == (
        4,
        3,
    )
    assert [t.n_outputs(2) for t in Task] == [1, 2, 2]
    assert Task.MULTICLASS.indicators(np.array([2, 0]), 3).tolist() == [[0, 0, 1], [1, 0, 0]]
