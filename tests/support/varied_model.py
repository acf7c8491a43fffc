"""Untrained models whose answers vary from film to film, with an OOD check: what comparing two runtimes needs.

A random-init network answers nearly the same probability for every film, so two runtimes agreeing on it proves
little; :func:`varied` rescales its head so the logits spread over the given films (standard deviation ~2)."""

from __future__ import annotations

import numpy as np
import torch

from cxr.data.sources.synthetic import render
from cxr.models import build_model
from cxr.models.card import OodCheck
from cxr.models.ood import METHOD, FeatureTap, OodDetector, ood_stages
from cxr.models.predictor import Predictor
from support.tiny_model import tiny_card


def simple_cnn(outputs: int = 1, n_tabular: int = 0, seed: int = 0) -> torch.nn.Module:
    """A random-init width-8 simple_cnn."""
    torch.manual_seed(seed)
    return build_model("simple_cnn", outputs, width=8, n_tabular=n_tabular)


def synthetic_films(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` rendered chest films (half with findings), uint8 (n, size, size)."""
    rng = np.random.default_rng(seed)
    return np.stack([(render(rng, i % 2, 0.3, size) * 255).astype(np.uint8) for i in range(n)])


def as_input(films: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(films).unsqueeze(1).float() / 255


@torch.no_grad()
def varied(model: torch.nn.Module, films: np.ndarray, tabular: torch.Tensor | None = None) -> torch.nn.Module:
    """``model`` (a network or an ensemble, eval mode) with every head rescaled: logits spread ~N(0, 2) on ``films``."""
    model.eval()
    for i, net in enumerate(getattr(model, "members", [model])):
        x = model.member_input(i, as_input(films)) if hasattr(model, "member_input") else as_input(films)
        z = net(x, tabular) - net.head.bias  # the head's weights times its inputs
        scale = 2.0 / z.std(dim=0).clamp(min=1e-12)
        net.head.weight.mul_(scale[:, None])
        net.head.bias.copy_(-scale * z.mean(dim=0))
    return model


@torch.no_grad()
def predictor_with_ood(model: torch.nn.Module, size: int, fit_films: np.ndarray, **card) -> Predictor:
    """The Predictor of ``model`` with an OOD check fitted on ``fit_films`` as training fits one (two classes)."""
    stages = ood_stages(model)
    with FeatureTap(model, stages) as tap:
        stacked = getattr(model, "stacked", None)
        stacked(as_input(fit_films)) if stacked else model(as_input(fit_films))
        tap.end_batch()
    summaries = tap.take()
    detector = OodDetector.fitted(summaries, np.arange(len(fit_films)) % 2)
    threshold = float(np.quantile(detector.score(summaries), 0.9))
    check = OodCheck(method=METHOD, stages=stages, dims=detector.dims, classes=2, threshold=threshold,
                     val_pass_rate=0.9, fit_images=len(fit_films))  # fmt: skip
    return Predictor(model, tiny_card(model.spec, size, **card).model_copy(update={"ood": check}), ood=detector)
