"""The decision threshold, chosen on validation with the configured rule, and the scores it is chosen on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cxr.data.loader import PreparedData
from cxr.errors import UserError
from cxr.evaluation.metrics import choose_threshold
from cxr.task import Task
from cxr.training.scoring import augmented_scores, predict_split

if TYPE_CHECKING:
    from cxr.config import Config


def threshold_scores(
    model: torch.nn.Module,
    data: PreparedData,
    val_idx: np.ndarray,
    val_probs: np.ndarray | None,
    cfg: "Config",
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """The validation targets and scores the threshold is chosen on, scored in fp32 as the saved Predictor
    (evaluation, serving) scores them: a threshold chosen on bf16 scores could put a film near it on the
    other side there.

    With ``evaluate.threshold_augmented_copies`` = k > 0: k copies of the validation split seen through the
    training augmentation (seeded). Clean validation films are in-distribution (normals score near 0), so a
    cut-off chosen on them alone sits lower than the scores that films from another scanner or site get; the
    augmentation stands for that variation. Else the validation films as they are: ``val_probs`` when the
    caller has their fp32 scores at hand, otherwise scored here.
    """
    k = cfg.evaluate.threshold_augmented_copies
    if k == 0 or data.task.exclusive or cfg.train.augment.strength <= 0:
        if val_probs is None:
            val_probs = predict_split(model, data, val_idx, cfg.train.batch_size * 2, device, data.task, "fp32")
        return data.targets[val_idx], val_probs
    return augmented_scores(
        model, data, val_idx, cfg.train.augment, k, cfg.project.seed, cfg.train.batch_size * 2, device, "fp32"
    )


def choose_thresholds(task: Task | str, y: np.ndarray, probs: np.ndarray, cfg: "Config") -> Any:
    task, ev = Task(task), cfg.evaluate
    if task.binary:
        if not 0 < y.sum() < len(y):
            raise UserError("the validation split has one class only, so no threshold can be chosen; use more data")
        return float(choose_threshold(y, probs, method=ev.threshold, target_sensitivity=ev.target_sensitivity))
    if task.multilabel:
        out = []
        for k in range(y.shape[1]):
            if 0 < y[:, k].sum() < len(y):
                out.append(
                    float(
                        choose_threshold(
                            y[:, k], probs[:, k], method=ev.threshold, target_sensitivity=ev.target_sensitivity
                        )
                    )
                )
            else:
                out.append(0.5)  # a class absent from validation: no evidence to move off 0.5
        return out
    return None
