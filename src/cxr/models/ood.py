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
    calls. :meth:`take` returns the summaries gathered since the last call: ``2 * len(stages)`` arrays
    ``(films, channels)``, means and standard deviations interleaved by stage.
    """

    def __init__(self, model: nn.Module, stages: Sequence[str]) -> None:
        self.model, self.stages = model, list(stages)
        self._calls: dict[str, list[tuple[Tensor, Tensor]]] = {s: [] for s in self.stages}
        self._rows: list[list[Tensor]] = [[] for _ in range(2 * len(self.stages))]
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
            flat = out.detach().double().contiguous().flatten(2)  # float64 sums: the distances magnify rounding
            self._calls[name].append((flat.mean(dim=2), flat.std(dim=2)))

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
            for j in (0, 1):
                self._rows[2 * i + j].append(torch.stack([c[j] for c in calls]).mean(dim=0).cpu())
            calls.clear()

    def take(self) -> list[Tensor]:
        out = [torch.cat(rows) if rows else torch.zeros(0) for rows in self._rows]
        self._rows = [[] for _ in self._rows]
        return out


class OodDetector(nn.Module):
    """Per summary: class means ``(classes, d)`` and the shared precision matrix ``(d, d)``."""

    def __init__(self, dims: Sequence[int], classes: int) -> None:
        super().__init__()
        self.dims, self.classes = [int(d) for d in dims], int(classes)
        for i, d in enumerate(self.dims):
            self.register_buffer(f"means_{i}", torch.zeros(self.classes, d))
            self.register_buffer(f"precision_{i}", torch.zeros(d, d))

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

    def score(self, summaries: Sequence[Tensor]) -> Tensor:
        """``(films,)`` scores, higher is further from the training films; float64, rounded to 1e-4. A film's
        features differ in their last bits with the batch it came in (the kernels sum in another order), which
        moves its score by about that much: nothing a decision away from the threshold notices."""
        total = torch.zeros(len(summaries[0]), dtype=torch.float64)
        for i, x in enumerate(summaries):
            means, precision = getattr(self, f"means_{i}").double(), getattr(self, f"precision_{i}").double()
            diff = x.double()[:, None, :] - means[None]  # (films, classes, d)
            dist = torch.einsum("ncd,de,nce->nc", diff, precision, diff).min(dim=1).values
            total += torch.log(dist.clamp_min(0) + _EPS)
        return torch.round(total, decimals=4)
