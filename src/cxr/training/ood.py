"""The out-of-distribution check fitted with every network (cxr.models.ood): its statistics from training films,
its threshold from validation films, so that ``ood.val_pass_rate`` of them pass."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from cxr.data.loader import PreparedData
from cxr.models.card import OodCheck
from cxr.models.ood import METHOD, FeatureTap, OodDetector, ood_stages
from cxr.training.scoring import predict_split

if TYPE_CHECKING:
    from cxr.config import Config


def fit_ood(
    model: torch.nn.Module, data: PreparedData, cfg: "Config", device: torch.device
) -> tuple[OodDetector, OodCheck] | None:
    """The detector and its card entry; None when ``ood.method`` is none or the model has no stages."""
    stages = ood_stages(model)
    if cfg.ood.method == "none" or not stages:
        return None
    train = fit_sample(data.split("train"), cfg.ood.max_fit_images, cfg.project.seed)
    detector = OodDetector.fitted(summaries(model, data, train, stages, cfg, device), class_index(data, train))
    val = detector.score(summaries(model, data, data.split("val"), stages, cfg, device))
    threshold = float(np.quantile(val, cfg.ood.val_pass_rate))
    check = OodCheck(
        method=METHOD,
        stages=stages,
        dims=detector.dims,
        classes=detector.classes,
        threshold=threshold,
        val_pass_rate=float(np.mean(val <= threshold)),
        fit_images=len(train),
    )
    return detector, check


def fit_sample(index: np.ndarray, most: int, seed: int) -> np.ndarray:
    if len(index) <= most:
        return index
    return np.sort(np.random.default_rng(seed).choice(index, most, replace=False))


def class_index(data: PreparedData, index: np.ndarray) -> np.ndarray:
    """Each film's class for class-conditional statistics; one class for multilabel films (unconditional)."""
    if data.task.multilabel:
        return np.zeros(len(index), np.int64)
    return data.targets[index].astype(np.int64)


@torch.inference_mode()
def summaries(
    model: torch.nn.Module,
    data: PreparedData,
    index: np.ndarray,
    stages: list[str],
    cfg: "Config",
    device: torch.device,
) -> list[np.ndarray]:
    """Each stage's channel means and standard deviations of ``index``'s films, as the served model sees them."""
    with FeatureTap(model, stages) as tap:
        predict_split(model, data, index, cfg.train.batch_size * 2, device, data.task, "fp32")
    return tap.take()
