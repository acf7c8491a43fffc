"""Scoring a network on the prepared splits: probabilities, AUROC, and the tuning yardstick.

The fp32/bf16 choice lives here (``autocast``) so that training, validation and the yardstick run alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from cxr.data.augment import augment
from cxr.data.loader import PreparedData
from cxr.task import Task

if TYPE_CHECKING:
    from cxr.config import AugmentConfig, Config


def task_auroc(y: np.ndarray, probs: np.ndarray, task: Task | str) -> float:
    """Validation AUROC for early stopping and pruning: macro over classes that have both labels."""
    task = Task(task)
    if task.binary:
        return float(roc_auc_score(y, probs)) if 0 < y.sum() < len(y) else 0.5
    y2 = task.indicators(y, probs.shape[1])
    scores = [roc_auc_score(y2[:, k], probs[:, k]) for k in range(probs.shape[1]) if 0 < y2[:, k].sum() < len(y2)]
    return float(np.mean(scores)) if scores else 0.5


@torch.inference_mode()
def predict_split(
    model: torch.nn.Module,
    data: PreparedData,
    index: np.ndarray,
    batch_size: int,
    device: torch.device,
    task: Task | str,
    precision: str,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    model.eval()
    task = Task(task)
    outs = []
    for x, _, t, _ in data.batches(index, batch_size, device=device):
        if transform is not None:
            x = transform(x)
        with autocast(device, precision):
            logits = model(x.contiguous(memory_format=torch.channels_last), t if model.n_tabular else None).float()
        outs.append(task.activate(logits).cpu().numpy())
    probs = np.concatenate(outs)
    return task.squeeze(probs)


def uses_bf16(device: torch.device, precision: str) -> bool:
    """``train.precision`` bf16, or auto on CUDA."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, precision))


def augmented_scores(
    model: torch.nn.Module,
    data: PreparedData,
    idx: np.ndarray,
    aug: "AugmentConfig",
    copies: int,
    seed: int,
    batch_size: int,
    device: torch.device,
    precision: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Targets and scores of ``copies`` passes over ``idx`` seen through ``aug``, drawn from ``seed``: the same
    seed and settings give the same copies, so models scored with them are compared on the same films."""
    gen = torch.Generator().manual_seed(seed)
    probs = [
        predict_split(
            model, data, idx, batch_size, device, data.task, precision, transform=lambda x: augment(x, aug, gen)
        )
        for _ in range(copies)
    ]
    return np.concatenate([data.targets[idx]] * copies), np.concatenate(probs)


@dataclass(frozen=True)
class Yardstick:
    """What a tuning trial is judged on: AUROC on ``copies`` seeded copies of validation seen through one fixed
    augmentation, the same for every trial whatever augmentation the trial trains with.

    Clean validation is cut from the training distribution, so it rewards trials that train with weak
    augmentation and then fail on films from elsewhere (PneumoniaMNIST, 50-trial studies: clean validation
    ranked trials against the shifted test split, Spearman -0.22; this yardstick ranked them with it, +0.74).
    """

    augment: "AugmentConfig"
    copies: int
    seed: int
    # fixed, not the trial's batch size: augment draws per batch, so another batch size would be other films
    batch_size: int = 256

    @classmethod
    def from_config(cls, cfg: "Config") -> "Yardstick":
        """``train.augment``, ``tune.objective_copies`` copies drawn from ``project.seed``."""
        return cls(cfg.train.augment, cfg.tune.objective_copies, cfg.project.seed)

    def auroc(
        self, model: torch.nn.Module, data: PreparedData, idx: np.ndarray, device: torch.device, precision: str
    ) -> float:
        copies = self.copies if self.augment.strength > 0 else 1  # no augmentation: every copy is the same
        y, probs = augmented_scores(
            model, data, idx, self.augment, copies, self.seed, self.batch_size, device, precision
        )
        return task_auroc(y, probs, data.task)
