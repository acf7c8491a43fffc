"""Several networks used as one model: an ensemble of seeds, and test-time augmentation over fixed views."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cxr.data.augment import apply_augment
from cxr.models.networks import ModelError


class Ensemble(nn.Module):
    """Several networks trained on the same data with different seeds, used as one model.

    ``forward`` averages the members' logits (for sigmoid outputs, the mean log-odds; for softmax, the
    normalised geometric mean of the probabilities), so the threshold is chosen, saved, evaluated and
    served for the ensemble exactly as for one network. Weights live under ``members.<i>.``.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ModelError(f"an ensemble needs at least 2 members, got {len(members)}")
        shapes = {(m.spec["n_outputs"], m.spec.get("n_tabular", 0)) for m in members}
        if len(shapes) > 1:
            raise ModelError(f"ensemble members disagree on (n_outputs, n_tabular): {sorted(shapes)}")
        self.members = nn.ModuleList(members)
        self.n_tabular = int(members[0].spec.get("n_tabular", 0))

    def forward(self, x: Tensor, tabular: Tensor | None = None) -> Tensor:
        return self.stacked(x, tabular).mean(dim=0)

    def stacked(self, x: Tensor, tabular: Tensor | None = None) -> Tensor:
        """Every member's logits, ``(members, B, n_outputs)``: their spread is the ensemble's uncertainty."""
        return torch.stack([m(x, tabular) for m in self.members])

    @property
    def spec(self) -> dict[str, Any]:
        return {"arch": "ensemble", "n_tabular": self.n_tabular, "members": [m.spec for m in self.members]}


class TestTimeAugmentation(nn.Module):
    """A network (or :class:`Ensemble`) whose logits are averaged over fixed augmented views of each image.

    The views are drawn once when the model is made (rows of :func:`cxr.data.augment.draw_augment`) and
    saved in its spec, and every image of every batch sees the same ones, so a film's score does not depend
    on what it is batched with. Averaging over small acquisition changes can steady a network on films
    from elsewhere (PneumoniaMNIST's shifted test split, 8 views: +0.002 to +0.005 AUROC on six default
    networks, but -0.003 on the tuned one; see benchmarks/README.md), at ``len(views)`` times the inference cost.
    Weights live under ``network.``.
    """

    __test__ = False  # a model, not a pytest test class

    def __init__(self, network: nn.Module, views: Tensor) -> None:
        super().__init__()
        if views.ndim != 2 or views.shape[0] < 1 or views.shape[1] != 7:
            raise ModelError(f"test-time augmentation needs (K >= 1, 7) views, got {tuple(views.shape)}")
        self.network = network
        self.register_buffer("views", views.float(), persistent=False)  # kept in the spec, not the weights
        self.n_tabular = int(network.spec.get("n_tabular", 0))

    def forward(self, x: Tensor, tabular: Tensor | None = None) -> Tensor:
        return self.stacked(x, tabular).mean(dim=0)

    def stacked(self, x: Tensor, tabular: Tensor | None = None) -> Tensor:
        """The logits of every view (and every member of an ensemble), ``(views [x members], B, n_outputs)``."""
        b = x.shape[0]
        views = [
            apply_augment(x, view.expand(b, -1)).contiguous(memory_format=torch.channels_last) for view in self.views
        ]
        inner = getattr(self.network, "stacked", None)
        return torch.cat([inner(v, tabular) if inner else self.network(v, tabular)[None] for v in views])

    @property
    def spec(self) -> dict[str, Any]:
        return {
            "arch": "tta",
            "n_tabular": self.n_tabular,
            "views": self.views.cpu().tolist(),
            "network": self.network.spec,
        }
