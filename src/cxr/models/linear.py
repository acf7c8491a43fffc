"""The classical baseline's network: average-pool to POOL x POOL, flatten, one linear layer.

``cxr.training.baseline`` fits it with scikit-learn's logistic regression and folds the scaler into the
weights, so the baseline is saved, loaded, evaluated and served exactly like a network.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ARCH = "logistic_regression"
POOL = 16


def pooled_pixels(x: torch.Tensor, pool: int = POOL) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1] -> (B, pool * pool): the classical baselines' inputs (this one's and the forest's)."""
    return F.adaptive_avg_pool2d(x, pool).flatten(1)


class LinearBaseline(nn.Module):
    """Average-pool to POOL x POOL, flatten, one linear layer: the torch twin of the sklearn model."""

    n_tabular = 0

    def __init__(self, n_outputs: int, pool: int = POOL) -> None:
        super().__init__()
        self.pool = pool
        self.linear = nn.Linear(pool * pool, n_outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_pixels(x, self.pool)

    def forward(self, x: torch.Tensor, tabular: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(self.features(x))

    @property
    def spec(self) -> dict[str, Any]:
        return {"arch": ARCH, "n_outputs": self.linear.out_features, "pool": self.pool, "n_tabular": 0}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "LinearBaseline":
        return cls(int(spec["n_outputs"]), int(spec.get("pool", POOL)))
