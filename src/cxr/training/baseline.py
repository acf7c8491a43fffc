"""A classical baseline: scikit-learn logistic regression on downsampled pixels.

It is fitted with scikit-learn, then stored as an equivalent linear torch module (scaler folded into
the weights), so it is saved, loaded, evaluated and served exactly like a network: `model.arch:
logistic_regression` in params.yaml, through the same fit -> Predictor -> evaluate path.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cxr.models.linear import POOL, LinearBaseline

if TYPE_CHECKING:
    from cxr.config import Config
    from cxr.training.fit import FitResult

log = logging.getLogger(__name__)


def _features(model: LinearBaseline, images: np.ndarray, batch: int = 2048) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate(
            [
                model.features(
                    torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).unsqueeze(1).float() / 255
                ).numpy()
                for i in range(0, len(images), batch)
            ]
        )


def fit_baseline(
    cfg: "Config",
    *,
    model_dir: Path | None = None,
    run_name: str | None = None,
    nested: bool = False,
    log_model: bool = True,
    extra_tags: dict[str, str] | None = None,
    run_id: str | None = None,
) -> "FitResult":
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    from cxr.data.loader import PreparedData
    from cxr.models.predictor import Predictor
    from cxr.tracking import runs as tracking
    from cxr.training.fit import FitResult, choose_thresholds, model_info, task_auroc

    # Fitted without augmentation, so there is no trained-for variation to choose its threshold under.
    cfg = cfg.override({"evaluate.threshold_augmented_copies": 0})
    data = PreparedData(cfg.paths.prepared, cfg.model.image_size)
    train_idx, val_idx = data.split("train"), data.split("val")
    model = LinearBaseline(data.n_outputs)
    t0 = time.perf_counter()
    x_train = _features(model, data.images[train_idx])
    scaler = StandardScaler().fit(x_train)
    weight = "balanced" if cfg.train.imbalance != "none" else None
    lr = LogisticRegression(C=1.0, max_iter=2000, class_weight=weight)
    clf = OneVsRestClassifier(lr) if data.task == "multilabel" else lr
    clf.fit(scaler.transform(x_train), data.targets[train_idx].astype(np.int64))
    coef = np.vstack([e.coef_ for e in clf.estimators_]) if data.task == "multilabel" else clf.coef_
    bias = np.concatenate([e.intercept_ for e in clf.estimators_]) if data.task == "multilabel" else clf.intercept_
    # fold the scaler in: w.(x - mu)/sigma + b  ==  (w/sigma).x + (b - w.mu/sigma)
    w = coef / scaler.scale_
    b = bias - (coef * scaler.mean_ / scaler.scale_).sum(1)
    with torch.no_grad():
        model.linear.weight.copy_(torch.from_numpy(w.astype(np.float32)))
        model.linear.bias.copy_(torch.from_numpy(b.astype(np.float32)))
    seconds = time.perf_counter() - t0
    probe = Predictor(model, model_info(cfg, model.spec, data, None))
    val_probs = probe.predict_proba(data.images[val_idx])
    val_auroc = task_auroc(data.targets[val_idx], val_probs, data.task)
    threshold = choose_thresholds(data.task, data.targets[val_idx], val_probs, cfg)
    model_dir = Path(model_dir or cfg.paths.model)
    with tracking.run(
        cfg,
        name=run_name,
        nested=nested,
        tags={**tracking.lineage_tags(data.card), **(extra_tags or {})},
        run_id=run_id,
    ) as active:
        run_id = active.info.run_id if active else None
        info = model_info(
            cfg,
            model.spec,
            data,
            threshold,
            run_id=run_id,
            best_epoch=1,
            val_auroc=val_auroc,
            epochs_trained=1,
            git_commit=tracking.git_state()["git_commit"],
        )
        Predictor(model, info).save(model_dir)
        if active:
            import mlflow

            mlflow.log_params(cfg.flat())
            mlflow.log_metrics({"val_auroc": val_auroc, "best_val_auroc": val_auroc, "fit_seconds": seconds})
            if log_model:
                tracking.log_cxr_model(model_dir, tracking.example_batch(cfg.model.image_size))
    log.info("logistic regression on %dx%d pixels: val AUROC %.4f (%.1fs)", POOL, POOL, val_auroc, seconds)
    return FitResult(
        model_dir=model_dir,
        run_id=run_id,
        best_epoch=1,
        best_val_auroc=val_auroc,
        epochs_trained=1,
        images_per_second=len(train_idx) / max(seconds, 1e-9),
        history=[{"val_auroc": val_auroc}],
        threshold=threshold,
    )
