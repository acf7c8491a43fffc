"""Fixtures for unit tests: a tiny untrained model behind the real Predictor."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from cxr.models import build_model
from cxr.models.predictor import Predictor
from support.tiny_model import tiny_card


@pytest.fixture
def tiny_predictor() -> Callable[..., Predictor]:
    """``make(size=32, task="binary", labels=(...))``: a random-init width-8 simple_cnn Predictor."""

    def make(size: int = 32, task: str = "binary", labels=("normal", "pneumonia"), seed: int = 0) -> Predictor:
        torch.manual_seed(seed)
        model = build_model("simple_cnn", 1 if task == "binary" else len(labels), width=8)
        return Predictor(model, tiny_card(model.spec, size, task, labels))

    return make
