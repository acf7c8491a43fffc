"""The classical baselines: scikit-learn on downsampled pixels (``model.arch: logistic_regression | random_forest``).

Each is fitted with scikit-learn, then stored as an equivalent torch module: the logistic regression as a linear
layer (the scaler folded into the weights), the random forest as its trees' tensors (:mod:`cxr.models.forest`).
So a baseline takes the same tail as a network (threshold on validation, model card, saving, logging) and is
loaded, evaluated and served exactly like one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler

from cxr.data.loader import PreparedData
from cxr.models.forest import ARCH as FOREST_ARCH
from cxr.models.forest import ForestBaseline
from cxr.models.linear import ARCH as LINEAR_ARCH
from cxr.models.linear import POOL, LinearBaseline, pooled_pixels
from cxr.training.scoring import predict_split, task_auroc

if TYPE_CHECKING:
    from cxr.config import Config

log = logging.getLogger(__name__)


@dataclass
class FittedBaseline:
    model: torch.nn.Module
    val_probs: np.ndarray
    val_auroc: float
    images_per_second: float
    metrics: dict[str, float]


def pixel_features(images: np.ndarray, batch: int = 2048) -> np.ndarray:
    """(N, H, W) uint8 films -> (N, POOL * POOL) float32: what both baselines see (as their torch twins compute it)."""
    with torch.inference_mode():
        chunks = [torch.from_numpy(np.ascontiguousarray(images[i : i + batch])) for i in range(0, len(images), batch)]
        return np.concatenate([pooled_pixels(c.unsqueeze(1).float() / 255).numpy() for c in chunks])


def class_weight(cfg: "Config") -> str | None:
    return "balanced" if cfg.train.imbalance != "none" else None


def _classifier(cfg: "Config", data: PreparedData, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, StandardScaler]:
    """(coefficients, intercepts, scaler) of a class-weighted logistic regression on standardised features."""
    scaler = StandardScaler().fit(x)
    lr = LogisticRegression(C=1.0, max_iter=2000, class_weight=class_weight(cfg))
    clf = OneVsRestClassifier(lr) if data.task.multilabel else lr
    clf.fit(scaler.transform(x), data.targets[data.split("train")].astype(np.int64))
    if data.task.multilabel:
        return (
            np.vstack([e.coef_ for e in clf.estimators_]),
            np.concatenate([e.intercept_ for e in clf.estimators_]),
            scaler,
        )
    return clf.coef_, clf.intercept_, scaler


def _linear(cfg: "Config", data: PreparedData, x: np.ndarray) -> LinearBaseline:
    model = LinearBaseline(data.n_outputs)
    coef, bias, scaler = _classifier(cfg, data, x)
    # fold the scaler in: w.(x - mu)/sigma + b  ==  (w/sigma).x + (b - w.mu/sigma)
    with torch.no_grad():
        model.linear.weight.copy_(torch.from_numpy((coef / scaler.scale_).astype(np.float32)))
        model.linear.bias.copy_(
            torch.from_numpy((bias - (coef * scaler.mean_ / scaler.scale_).sum(1)).astype(np.float32))
        )
    return model


def random_forest(cfg: "Config", data: PreparedData, x: np.ndarray) -> RandomForestClassifier:
    """The class-weighted forest ``model.forest`` describes, fitted on the training films' features ``x``."""
    f = cfg.model.forest
    forest = RandomForestClassifier(
        n_estimators=f.n_estimators,
        max_depth=f.max_depth,
        min_samples_leaf=f.min_samples_leaf,
        class_weight=class_weight(cfg),
        random_state=cfg.project.seed,
        n_jobs=-1,  # trees fit in threads; the result does not depend on how many
    )
    return forest.fit(x, data.targets[data.split("train")].astype(np.int64))  # multilabel: one output per label


def _forest(cfg: "Config", data: PreparedData, x: np.ndarray) -> ForestBaseline:
    return ForestBaseline.from_sklearn(random_forest(cfg, data, x), data.n_outputs, softmax=data.task.exclusive)


_FITTERS: dict[str, Callable[["Config", PreparedData, np.ndarray], torch.nn.Module]] = {
    LINEAR_ARCH: _linear,
    FOREST_ARCH: _forest,
}
BASELINE_ARCHS: tuple[str, ...] = tuple(_FITTERS)


def fit_baseline(cfg: "Config", data: PreparedData) -> FittedBaseline:
    """``model.arch``'s baseline fitted on the training films, scored on validation as the saved model scores."""
    train_idx, val_idx = data.split("train"), data.split("val")
    t0 = time.perf_counter()
    model = _FITTERS[cfg.model.arch](cfg, data, pixel_features(data.images[train_idx]))
    seconds = time.perf_counter() - t0
    val_probs = predict_split(model, data, val_idx, 256, torch.device("cpu"), data.task, "fp32")
    val_auroc = task_auroc(data.targets[val_idx], val_probs, data.task)
    log.info("%s on %dx%d pixels: val AUROC %.4f (%.1fs)", cfg.model.arch, POOL, POOL, val_auroc, seconds)
    metrics = {"val_auroc": val_auroc, "best_val_auroc": val_auroc, "fit_seconds": seconds}
    return FittedBaseline(model, val_probs, val_auroc, len(train_idx) / max(seconds, 1e-9), metrics)
