"""Building models: a fresh network from the config's names, or any saved model rebuilt from its JSON spec."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cxr.models.forest import ARCH as FOREST_ARCH
from cxr.models.forest import ForestBaseline
from cxr.models.linear import LinearBaseline
from cxr.models.networks import (
    OPTIONAL_SPEC_KEYS,
    RANDOM_MEAN,
    RANDOM_STD,
    SPEC_KEYS,
    CXRNet,
    ModelError,
    arch_spec,
    check_input_size,
    check_params,
)
from cxr.models.weights import load_imagenet_state_dict, load_weights
from cxr.models.wrappers import Ensemble, TestTimeAugmentation


def _weights_kind(weights: str | Path | None) -> str:
    if weights is None:
        return "none"
    if isinstance(weights, str) and weights.strip().lower() in ("", "none"):
        return "none"
    if isinstance(weights, str) and weights.strip().lower() == "imagenet":
        return "imagenet"
    return "path"


def _norm_stats(arch: str, kind: str) -> tuple[float, float]:
    pretrained = arch_spec(arch).pretrained_norm
    if kind == "none" or pretrained is None:
        return RANDOM_MEAN, RANDOM_STD
    return pretrained


def model_spec(
    arch: str,
    n_outputs: int,
    *,
    weights: str | Path = "none",
    dropout: float = 0.2,
    width: int = 32,
    n_tabular: int = 0,
    image_size: int | None = None,
) -> dict[str, Any]:
    """The spec ``build_model`` would produce (for a full CXRNet weights file the file's buffers win)."""
    spec = arch_spec(arch)
    check_params(n_outputs, dropout, width, n_tabular)
    if image_size is not None:
        check_input_size(arch, int(image_size))
    mean, std = _norm_stats(arch, _weights_kind(weights))
    out = {
        "arch": arch,
        "n_outputs": int(n_outputs),
        "dropout": float(dropout),
        "width": int(width),
        "n_tabular": int(n_tabular),
        "norm_mean": mean,
        "norm_std": std,
    }
    if spec.fixed_size:  # the network is built for this input side
        if image_size is None:
            raise ModelError(f"{arch} is built for one input size: give its image_size (model.image_size)")
        out["image_size"] = int(image_size)
    return out


def build_model(
    arch: str,
    n_outputs: int,
    *,
    weights: str = "none",
    dropout: float = 0.2,
    width: int = 32,
    n_tabular: int = 0,
    image_size: int | None = None,
) -> CXRNet:
    """Build a :class:`CXRNet`.

    Args:
        arch: one of :data:`ARCHS`.
        n_outputs: number of logits (1 for binary).
        weights: ``"none"`` (random init), ``"imagenet"`` (torchvision default weights from the torch
            hub cache or downloaded; :class:`ModelError` if neither works) or a path to a local
            ``.safetensors``/``.pt``/``.pth`` state dict of the torchvision backbone or of a CXRNet.
        dropout: dropout before the head.
        width: base channel count of ``simple_cnn``, hidden width of ``mlp`` (ignored by torchvision archs).
        n_tabular: length of the tabular vector fused with the image features (0 = none).
        image_size: the input side it will see: checked against the arch's smallest; ``mlp`` is built for it.
    """
    kind = _weights_kind(weights)
    if kind == "imagenet" and arch_spec(arch).torchvision is None:
        raise ModelError(f"no pretrained weights for {arch}: use weights='none' or a local weights file")
    spec = model_spec(
        arch, n_outputs, weights=weights, dropout=dropout, width=width, n_tabular=n_tabular, image_size=image_size
    )
    imagenet = load_imagenet_state_dict(arch) if kind == "imagenet" else None  # offline: fails before building
    model = build_from_spec(spec)
    if imagenet is not None:
        model.load_backbone_state_dict(imagenet, source=f"ImageNet weights for {arch}")
    elif kind == "path":
        load_weights(model, weights)
    return model


def build_from_spec(spec: Mapping[str, Any]) -> CXRNet:
    """Rebuild a randomly initialised :class:`CXRNet` from :attr:`CXRNet.spec` (load its weights afterwards)."""
    if not isinstance(spec, Mapping):
        raise ModelError(f"model spec must be a mapping, got {type(spec).__name__}")
    if spec.get("arch") == "tta":
        return TestTimeAugmentation(build_from_spec(spec["network"]), torch.tensor(spec["views"]))  # type: ignore[return-value]
    if spec.get("arch") == "ensemble":
        members = [build_from_spec(member) for member in spec.get("members", [])]
        sizes = {k: spec.get(k) for k in ("weights", "input_sizes", "image_size")}
        return Ensemble(members, **sizes)  # type: ignore[return-value]
    if spec.get("arch") == "logistic_regression":  # the classical baseline, stored as its linear twin
        return LinearBaseline.from_spec(dict(spec))  # type: ignore[return-value]
    if spec.get("arch") == FOREST_ARCH:  # the random-forest baseline, stored as its trees' tensors
        return ForestBaseline.from_spec(dict(spec))  # type: ignore[return-value]
    missing = [k for k in SPEC_KEYS if k not in spec]
    unknown = [k for k in spec if k not in SPEC_KEYS + OPTIONAL_SPEC_KEYS]
    if missing or unknown:
        raise ModelError(
            f"invalid model spec: missing {missing or 'nothing'}, unknown {unknown or 'nothing'}; "
            f"expected keys {', '.join(SPEC_KEYS)}"
        )
    return CXRNet(
        spec["arch"],
        int(spec["n_outputs"]),
        dropout=float(spec["dropout"]),
        width=int(spec["width"]),
        n_tabular=int(spec["n_tabular"]),
        norm_mean=float(spec["norm_mean"]),
        norm_std=float(spec["norm_std"]),
        image_size=int(spec["image_size"]) if "image_size" in spec else None,
    )
