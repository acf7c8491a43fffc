"""Out-of-distribution (OOD) score: how far a film's internal features lie from the training films'.

Method ``feature_mahalanobis`` (Lee et al., NeurIPS 2018, with mean and standard-deviation pooling): at each
stage of the network (:func:`ood_stages`) a film's feature map is summarised by every channel's mean and
standard deviation over the image. For each summary, class-conditional Gaussians sharing one covariance
(Ledoit-Wolf shrinkage) are fitted on training films. A film's score is the sum over summaries of the log of its
smallest Mahalanobis distance to a class mean: a geometric mean, so no summary's scale dominates. The features
are taken by forward hooks during the usual forward pass, so scoring costs a few small matrix products.
Chosen by measurement against the alternatives in benchmarks/ood.py.

The statistics are buffers of :class:`OodDetector`, saved in model.safetensors under ``ood.``; what they are
(stages, sizes, threshold) is the model card's :class:`~cxr.models.card.OodCheck`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from torch import Tensor, nn

METHOD = "feature_mahalanobis"
PREFIX = "ood."  # of the detector's tensors in model.safetensors
_EPS = 1e-6


def ood_stages(model: nn.Module) -> list[str]:
    """Names of the modules whose outputs the OOD score summarises: every stage of every network in ``model``
    (an ensemble's members, a test-time-augmentation model's network); [] for a model without stages."""
    if hasattr(model, "members"):
        return [f"members.{i}.{s}" for i, m in enumerate(model.members) for s in ood_stages(m)]
    if hasattr(model, "network"):
        return [f"network.{s}" for s in ood_stages(model.network)]
    return list(getattr(model, "ood_stages", []))


class FeatureTap:
    """Forward hooks on ``stages`` of ``model`` that keep each film's channel means and standard deviations.

    A stage called several times in one forward pass (test-time augmentation's views) gives the average of its
    calls. :meth:`take` returns the summaries gathered since the last call: ``2 * len(stages)`` float64 arrays
    ``(films, channels)``, means and standard deviations interleaved by stage. The hooks only sum the map and its
    square (fast, in the map's own layout); the rest is a few numpy operations per batch.
    """

    def __init__(self, model: nn.Module, stages: Sequence[str]) -> None:
        self.model, self.stages = model, list(stages)
        self._calls: dict[str, list[tuple[Tensor, Tensor, int]]] = {s: [] for s in self.stages}
        self._rows: list[list[np.ndarray]] = [[] for _ in range(2 * len(self.stages))]
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "FeatureTap":
        for name in self.stages:
            self._hooks.append(self.model.get_submodule(name).register_forward_hook(self._stage_hook(name)))
        self._hooks.append(self.model.register_forward_hook(self._end_of_forward))
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _stage_hook(self, name: str):
        def keep(_module: nn.Module, _inputs: object, out: Tensor) -> None:
            self._calls[name].append(stage_sums(out.detach()))

        return keep

    def _end_of_forward(self, *_: object) -> None:
        self.end_batch()

    def end_batch(self) -> None:
        """Close the films seen since the last call (a caller that runs the model other than by calling it, such
        as an ensemble's ``stacked``, calls this after each batch; calling the model does it by itself)."""
        for i, name in enumerate(self.stages):
            calls = self._calls[name]
            if not calls:
                continue
            moments = [_moments(total, squares, n) for total, squares, n in calls]
            for j in (0, 1):
                self._rows[2 * i + j].append(np.mean([m[j] for m in moments], axis=0))
            calls.clear()

    def take(self) -> list[np.ndarray]:
        out = [np.concatenate(rows) if rows else np.zeros((0, 0)) for rows in self._rows]
        self._rows = [[] for _ in self._rows]
        return out


def stage_sums(out: Tensor) -> tuple[Tensor, Tensor, int]:
    """A stage's map ``(B, C, h, w)`` summed over the image, and its square: ``(B, C)`` each, and ``h * w``."""
    out = out.float()
    return out.sum(dim=(2, 3)), out.square().sum(dim=(2, 3)), out.shape[2] * out.shape[3]


def channel_moments(total: Tensor, squares: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Channel means and standard deviations (float64) from the sums of a map and of its square; the exported
    ONNX graph computes them with this same function (cxr.models.onnx_export)."""
    total, squares = total.double(), squares.double()
    variance = (squares - total * total / n) / max(n - 1, 1)
    return total / n, variance.clamp(min=0).sqrt()


def _moments(total: Tensor, squares: Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
    mean, std = channel_moments(total.cpu(), squares.cpu(), n)
    return mean.numpy(), std.numpy()


class OodDetector(nn.Module):
    """Per summary: class means ``(classes, d)`` and the shared precision matrix ``(d, d)``."""

    def __init__(self, dims: Sequence[int], classes: int) -> None:
        super().__init__()
        self.dims, self.classes = [int(d) for d in dims], int(classes)
        for i, d in enumerate(self.dims):
            self.register_buffer(f"means_{i}", torch.zeros(self.classes, d))
            self.register_buffer(f"precision_{i}", torch.zeros(d, d))
        self._stats: tuple[tuple[int, ...], list[tuple[np.ndarray, np.ndarray]]] | None = None

    @classmethod
    def fitted(cls, summaries: Sequence[np.ndarray], labels: np.ndarray) -> "OodDetector":
        """Fit on training films' summaries; ``labels`` is each film's class index (one class: unconditional)."""
        classes = np.unique(labels)
        detector = cls([s.shape[1] for s in summaries], len(classes))
        for i, x in enumerate(summaries):
            x = np.asarray(x, dtype=np.float64)
            means = np.stack([x[labels == c].mean(axis=0) for c in classes])
            centred = x - means[np.searchsorted(classes, labels)]
            getattr(detector, f"means_{i}").copy_(torch.from_numpy(means))
            getattr(detector, f"precision_{i}").copy_(torch.from_numpy(LedoitWolf().fit(centred).precision_))
        return detector

    def statistics(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(means, precision) per summary as float64 arrays, converted once (again only if the buffers change)."""
        buffers = [
            b for i in range(len(self.dims)) for b in (getattr(self, f"means_{i}"), getattr(self, f"precision_{i}"))
        ]
        version = tuple(b._version for b in buffers)
        if self._stats is None or self._stats[0] != version:
            arrays = [b.cpu().numpy().astype(np.float64) for b in buffers]
            self._stats = (version, list(zip(arrays[::2], arrays[1::2])))
        return self._stats[1]

    def score(self, summaries: Sequence[np.ndarray]) -> np.ndarray:
        """``(films,)`` scores, higher is further from the training films; rounded to 1e-4. A film's features
        differ in their last bits with the batch it came in (the kernels sum in another order), which the
        distances magnify: its score moves by up to ~1e-4 of itself (measured), which only a film that close to
        the threshold notices."""
        total = np.zeros(len(summaries[0]))
        for (means, precision), x in zip(self.statistics(), summaries):
            diff = np.asarray(x, dtype=np.float64)[:, None, :] - means[None]  # (films, classes, d)
            dist = ((diff @ precision) * diff).sum(axis=2).min(axis=1)
            total += np.log(np.maximum(dist, 0) + _EPS)
        return np.round(total, 4)
