"""What a training run is made of: device and seeds, loss, optimizer, weight EMA and learning-rate schedule."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from cxr.data.loader import PreparedData
from cxr.errors import UserError

if TYPE_CHECKING:
    from cxr.config import Config


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA device is available; use train.device=auto or cpu")
    return device


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic and device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def make_loss(data: PreparedData, train_idx: np.ndarray, cfg: "Config", device: torch.device):
    """Loss matching the task; with imbalance=weight, rarer classes weigh more."""
    y = data.targets[train_idx]
    weighted = cfg.train.imbalance == "weight"
    if data.task.exclusive:
        counts = np.bincount(y, minlength=len(data.classes)).astype(np.float64)
        w = torch.tensor(len(y) / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32, device=device)
        return lambda logits, t: F.cross_entropy(
            logits, t, weight=w if weighted else None, label_smoothing=cfg.train.label_smoothing
        )
    y2 = y.reshape(len(y), -1)
    pos = y2.sum(0)
    pw = torch.tensor(np.clip((len(y2) - pos) / np.maximum(pos, 1), 0.01, 100.0), dtype=torch.float32, device=device)
    smooth = cfg.train.label_smoothing

    def loss(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(logits.shape)
        if smooth:
            t = t * (1 - smooth) + 0.5 * smooth
        return F.binary_cross_entropy_with_logits(logits, t, pos_weight=pw if weighted else None)

    return loss


def sample_weights(data: PreparedData, cfg: "Config") -> np.ndarray | None:
    """Balanced sampling: each class drawn equally often (multilabel falls back to loss weights)."""
    if cfg.train.imbalance != "sample" or data.task.multilabel:
        return None
    y = data.targets.astype(np.int64)
    counts = np.bincount(y[data.split("train")], minlength=max(2, len(data.classes)))
    return (1.0 / np.maximum(counts, 1))[y]


def _decay_groups(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float, lr: float) -> list[dict]:
    """Weights with weight decay, biases and norms without, at ``lr``."""
    decay, no_decay = [], []
    for name, p in named:
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
    ]


def make_optimizer(model: torch.nn.Module, cfg: "Config") -> torch.optim.Optimizer:
    """Every parameter, frozen ones too (they take no gradient, so no step, until released). With
    ``train.backbone_lr_scale`` != 1 the backbone's two groups follow the head's, at the scaled rate."""
    named, lr, wd = list(model.named_parameters()), cfg.train.lr, cfg.train.weight_decay
    scale = cfg.train.backbone_lr_scale
    if scale == 1.0:
        groups = _decay_groups(named, wd, lr)
    else:
        head = [(n, p) for n, p in named if not n.startswith("backbone.")]
        backbone = [(n, p) for n, p in named if n.startswith("backbone.")]
        groups = _decay_groups(head, wd, lr) + _decay_groups(backbone, wd, lr * scale)
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.train.lr)


def make_ema(model: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """Weight EMA (BN buffers included); its decay warms up so short runs are not dominated by init.

    One foreach update per step with the decay kept on the device: a per-tensor ``avg_fn`` calling
    ``float(n)`` cost a GPU sync per parameter. Same arithmetic as avg * d + current * (1 - d).
    """
    if decay <= 0:
        return None

    def ema(avg: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        n = n.double()
        d = torch.clamp((1 + n) / (10 + n), max=decay)
        keep, take = d.float(), (1 - d).float()  # rounded once, as Python float scalars were
        if avg[0].is_floating_point():
            torch._foreach_mul_(avg, keep)
            torch._foreach_add_(avg, torch._foreach_mul(current, take))
        else:  # BatchNorm's integer num_batches_tracked: computed in float, truncated on copy
            for a, c in zip(avg, current):
                a.copy_(a * keep + c * take)

    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema, use_buffers=True)


def make_scheduler(opt: torch.optim.Optimizer, cfg: "Config", steps_per_epoch: int):
    kind = cfg.train.scheduler
    if kind == "onecycle" and cfg.train.epochs * steps_per_epoch >= 8:  # too few steps for warm-up + decay
        return torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=[g["lr"] for g in opt.param_groups],
            total_steps=cfg.train.epochs * steps_per_epoch,
            pct_start=0.25,
        ), "step"
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.train.epochs), "epoch"
    if kind == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.3, patience=2), "plateau"
    return None, "none"
