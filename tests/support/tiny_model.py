"""An untrained tiny model behind the real Predictor: what tests need when the weights do not matter."""

from __future__ import annotations

from pathlib import Path

import torch

from cxr.imaging import ReadLimits
from cxr.models import build_model
from cxr.models.card import Limits, Lineage, ModelCard, Preprocessing
from cxr.models.predictor import Predictor
from cxr.preprocess import PreprocessSpec


def tiny_card(architecture: dict, size: int = 32, task: str = "binary", labels=("normal", "pneumonia")) -> ModelCard:
    """The card training would write for an untrained model on test data."""
    limits = ReadLimits()
    return ModelCard(
        architecture=architecture,
        preprocess=Preprocessing.of(PreprocessSpec(size=size)),
        read_limits=Limits(min_side=limits.min_side, max_pixels=limits.max_pixels, max_bytes=limits.max_bytes),
        task=task,
        labels=list(labels),
        threshold=0.5 if task == "binary" else None,
        training=Lineage(dataset_hash="test", source="synthetic", synthetic=True),
    )


def tiny_model_dir(path: Path, size: int = 32, seed: int = 0) -> Path:
    """A saved random-init width-8 simple_cnn (binary) model directory."""
    torch.manual_seed(seed)
    model = build_model("simple_cnn", 1, width=8)
    return Predictor(model, tiny_card(model.spec, size)).save(path)
