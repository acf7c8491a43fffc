"""Several networks used as one model: an ensemble (of seeds or architectures), and test-time augmentation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cxr.data.augment import apply_augment
from cxr.models.networks import ModelError


class Ensemble(nn.Module):
    """Several networks used as one model: seeds of one architecture (``train.ensemble``), or models of different
    architectures and input sizes (``cxr ensemble``).

    ``forward`` is the weighted mean of the members' logits (equal weights unless given; for sigmoid outputs, the
    mean log-odds; for softmax, the normalised geometric mean of the probabilities), so the threshold is chosen,
    saved, evaluated and served for the ensemble exactly as for one network. With ``input_sizes`` the ensemble
    takes ``image_size`` films and resizes them for each smaller member, antialiased as preprocessing's downscale
    is, by two fixed matrix products (which the ONNX graph carries as they are). Weights live under ``members.<i>.``;
    the member weights and sizes live in the spec.
    """

    def __init__(
        self,
        members: list[nn.Module],
        weights: Sequence[float] | None = None,
        input_sizes: Sequence[int] | None = None,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        if len(members) < 2:
            raise ModelError(f"an ensemble needs at least 2 members, got {len(members)}")
        shapes = {(m.spec["n_outputs"], m.spec.get("n_tabular", 0)) for m in members}
        if len(shapes) > 1:
            raise ModelError(f"ensemble members disagree on (n_outputs, n_tabular): {sorted(shapes)}")
        self.members = nn.ModuleList(members)
        self.n_tabular = int(members[0].spec.get("n_tabular", 0))
        self.input_sizes = None if input_sizes is None else [int(s) for s in input_sizes]
        self.image_size = None if self.input_sizes is None else int(image_size or max(self.input_sizes))
        if self.input_sizes is not None and (
            len(self.input_sizes) != len(members) or max(self.input_sizes) > self.image_size
        ):
            raise ModelError(
                f"ensemble input sizes {self.input_sizes} do not fit {len(members)} members at {self.image_size} px"
            )
        for i, side in enumerate(self.input_sizes or []):
            if side != self.image_size:  # kept in the spec, not the weights
                self.register_buffer(f"resize{i}", downscale_matrix(self.image_size, side), persistent=False)
        self.set_weights(weights)

    def set_weights(self, weights: Sequence[float] | None) -> None:
        """The members' weights: non-negative, normalised to sum to one (None: equal)."""
        w = torch.ones(len(self.members)) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
        if w.shape != (len(self.members),) or not bool(torch.all(w >= 0)) or float(w.sum()) <= 0:
            raise ModelError(f"ensemble weights must be {len(self.members)} non-negative numbers, got {w.tolist()}")
        self.weighted = weights is not None
        device = self.member_weights.device if hasattr(self, "member_weights") else None
        self.register_buffer("member_weights", (w / w.sum()).to(device), persistent=False)

    def forward(self, x: Tensor, tabular: Tensor | None = None) -> Tensor:
        return combine_logits(self, self.stacked(x, tabular))

    def stacked(self, x: Tensor, tabular: Tensor | None = None) -> Tensor:
        """Every member's logits, ``(members, B, n_outputs)``: their spread is the ensemble's uncertainty."""
        return torch.stack([m(self.member_input(i, x), tabular) for i, m in enumerate(self.members)])

    def member_input(self, i: int, x: Tensor) -> Tensor:
        resize = getattr(self, f"resize{i}", None)
        if resize is None:
            return x
        return (resize @ x @ resize.T).contiguous(memory_format=torch.channels_last)

    def stack_weights(self) -> Tensor:
        return self.member_weights

    @property
    def spec(self) -> dict[str, Any]:
        out = {"arch": "ensemble", "n_tabular": self.n_tabular, "members": [m.spec for m in self.members]}
        if self.weighted:
            out["weights"] = self.member_weights.tolist()
        if self.input_sizes is not None:
            out |= {"input_sizes": self.input_sizes, "image_size": self.image_size}
        return out


def downscale_matrix(size: int, side: int) -> Tensor:
    """``A`` (side, size) such that ``A @ x @ A.T`` is torch's antialiased bilinear resize of ``x`` (size, size)
    to (side, side), the filter PIL's bilinear downscale (preprocessing's) uses."""
    eye = torch.eye(size)[None, None]
    return F.interpolate(eye, size=(side, size), mode="bilinear", antialias=True, align_corners=False)[0, 0]


def combine_logits(model: nn.Module, stacked: Tensor) -> Tensor:
    """The model's logits from its members' / views' ``(S, B, K)``: their weighted mean (equal weights unless the
    model has ``stack_weights``)."""
    weights = getattr(model, "stack_weights", None)
    if weights is None:
        return stacked.mean(dim=0)
    return torch.einsum("s,sbk->bk", weights().to(stacked.dtype), stacked)


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
        return combine_logits(self, self.stacked(x, tabular))

    def stack_weights(self) -> Tensor:
        """Each (view, member) row of :meth:`stacked`: the inner ensemble's weights, shared equally by the views."""
        inner = getattr(self.network, "stack_weights", None)
        weights = inner() if inner else torch.ones(1, device=self.views.device)
        return weights.repeat(len(self.views)) / len(self.views)

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
