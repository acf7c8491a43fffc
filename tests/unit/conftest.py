"""Fixtures for unit tests: a tiny untrained model behind the real Predictor."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from cxr.models import build_model
from cxr.models.predictor import FORMAT, Predictor
from cxr.preprocess import PreprocessSpec


@pytest.fixture
def tiny_predictor() -> Callable[..., Predictor]:
    """``make(size=32, task="binary", labels=(...))``: a random-init width-8 simple_cnn Predictor."""

    def make(size: int = 32, task: str = "binary", labels=("normal", "pneumonia"), seed: int = 0) -> Predictor:
        torch.manual_seed(seed)
        model = build_model("simple_cnn", 1 if task == "binary" else len(labels), width=8)
        info = {
            "format": FORMAT,
            "architecture": model.spec,
            "preprocess": PreprocessSpec(size=size).to_dict(),
            "task": task,
            "labels": list(labels),
            "threshold": 0.5 if task == "binary" else None,
            "training": {"dataset_hash": "test"},
        }
        return Predictor(model, info)

    return make
