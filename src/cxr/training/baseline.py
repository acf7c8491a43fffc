"""A classical baseline: scikit-learn logistic regression on downsampled pixels.

It is fitted with scikit-learn, then stored as an equivalent linear torch module (the scaler folded into the
weights), so it takes the same tail as a network (threshold on validation, model card, saving, logging) and is
loaded, evaluated and served exactly like one: ``model.arch: logistic_regression`` in params.yaml.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler

from cxr.data.loader import PreparedData
from cxr.models.linear import POOL, LinearBaseline
from cxr.training.scoring import predict_split, task_auroc

if TYPE_CHECKING:
    from cxr.config import Config

log = logging.getLogger(__name__)


@dataclass
class FittedLinear:
    model: LinearBaseline
    val_probs: np.ndarray
    val_auroc: float
    images_per_second: float
    metrics: dict[str, float]


def _features(model: LinearBaseline, images: np.ndarray, batch: int = 2048) -> np.ndarray:
    with torch.inference_mode():
        chunks = [torch.from_numpy(np.ascontiguousarray(images[i : i + batch])) for i in range(0, len(images), batch)]
        return np.concatenate([model.features(c.unsqueeze(1).float() / 255).numpy() for c in chunks])


def _classifier(cfg: "Config", data: PreparedData, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, StandardScaler]:
    """(coefficients, intercepts, scaler) of a class-weighted logistic regression on standardised features."""
    scaler = StandardScaler().fit(x)
    weight = "balanced" if cfg.train.imbalance != "none" else None
    lr = LogisticRegression(C=1.0, max_iter=2000, class_weight=weight)
    clf = OneVsRestClassifier(lr) if data.task == "multilabel" else lr
    clf.fit(scaler.transform(x), data.targets[data.split("train")].astype(np.int64))
    if data.task == "multilabel":
        return (
            np.vstack([e.coef_ for e in clf.estimators_]),
            np.concatenate([e.intercept_ for e in clf.estimators_]),
            scaler,
        )
    return clf.coef_, clf.intercept_, scaler


def fit_linear(cfg: "Config", data: PreparedData) -> FittedLinear:
    train_idx, val_idx = data.split("train"), data.split("val")
    model = LinearBaseline(data.n_outputs)
    t0 = time.perf_counter()
    coef, bias, scaler = _classifier(cfg, data, _features(model, data.images[train_idx]))
    # fold the scaler in: w.(x - mu)/sigma + b  ==  (w/sigma).x + (b - w.mu/sigma)
    with torch.no_grad():
        model.linear.weight.copy_(torch.from_numpy((coef / scaler.scale_).astype(np.float32)))
        model.linear.bias.copy_(
            torch.from_numpy((bias - (coef * scaler.mean_ / scaler.scale_).sum(1)).astype(np.float32))
        )
    seconds = time.perf_counter() - t0
    val_probs = predict_split(model, data, val_idx, 256, torch.device("cpu"), data.task, "fp32")
    val_auroc = task_auroc(data.targets[val_idx], val_probs, data.task)
    log.info("logistic regression on %dx%d pixels: val AUROC %.4f (%.1fs)", POOL, POOL, val_auroc, seconds)
    metrics = {"val_auroc": val_auroc, "best_val_auroc": val_auroc, "fit_seconds": seconds}
    return FittedLinear(model, val_probs, val_auroc, len(train_idx) / max(seconds, 1e-9), metrics)
