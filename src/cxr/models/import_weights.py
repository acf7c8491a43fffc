"""``cxr import-weights``: a TorchXRayVision checkpoint (or a torchvision state dict) into safetensors plus a JSON.

A TorchXRayVision checkpoint is a whole pickled ``torchxrayvision.models.DenseNet``: it is opened by
:mod:`cxr.models.safe_unpickle`, the one place cxr unpickles more than tensors (an allow-list of the module classes
such a checkpoint holds, each an inert stand-in; anything else is refused before it runs). What comes out is
tensors (``NAME.safetensors``, checked to load into ``arch``) and JSON (``NAME.json``: normalisation, label order,
provenance), which ``model.weights=NAME.safetensors`` loads without any pickle.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import save
from torch import Tensor

from cxr.fsutil import atomic_write_bytes, sha256_file
from cxr.models.networks import PRETRAINED_MEAN, PRETRAINED_STD, CXRNet, ModelError, check_arch
from cxr.models.safe_unpickle import StandIn, load_checkpoint
from cxr.models.weights import _as_tensor_dict, read_state_dict
from cxr.models.weights_info import Source, WeightsInfo, write_info

log = logging.getLogger(__name__)

# TorchXRayVision's input convention: a [0, 1] film scaled to [-1024, 1024], i.e. (x - 0.5) / (1 / 2048).
XRV_MEAN, XRV_STD = 0.5, 1 / 2048


@dataclass
class Checkpoint:
    state: dict[str, Tensor]
    kind: str  # the pickled root class, or "state dict"
    labels: list[str] | None = None
    op_threshs: list[float | None] | None = None


@dataclass
class Imported:
    weights: Path
    info: Path
    description: WeightsInfo


def read_checkpoint(path: Path) -> Checkpoint:
    """The tensors and label facts of ``path``; a pickle holding anything but the allowed classes is refused."""
    if path.suffix.lower() == ".safetensors":
        return Checkpoint(read_state_dict(path), "state dict")
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    obj = load_checkpoint(path)
    if isinstance(obj, StandIn):
        return _from_module(obj)
    return Checkpoint(_as_tensor_dict(obj, str(path)), "state dict")


def _from_module(root: StandIn) -> Checkpoint:
    state = {k: v for k, v in root.state_dict().items() if k != "op_threshs"}  # thresholds go to the JSON
    labels = next((v for k in ("targets", "pathologies") if _is_labels(v := root.__dict__.get(k))), None)
    thresholds = root._buffers.get("op_threshs", root.__dict__.get("op_threshs"))
    return Checkpoint(state, "torchxrayvision.models.DenseNet", labels, _floats(thresholds))


def _is_labels(value: Any) -> bool:
    return isinstance(value, list | tuple) and bool(value) and all(isinstance(v, str) for v in value)


def _floats(value: Any) -> list[float | None] | None:
    if isinstance(value, Tensor):
        value = value.flatten().tolist()
    if not isinstance(value, list | tuple) or not all(isinstance(v, int | float) for v in value):
        return None
    return [float(v) if math.isfinite(v) else None for v in value]


def _first_conv_channels(state: Mapping[str, Tensor]) -> int:
    convs = [v for k, v in state.items() if v.ndim == 4 and k.endswith("weight")]
    return int(convs[0].shape[1]) if convs else 1


def _check_fits(state: dict[str, Tensor], arch: str, source: str) -> None:
    """The backbone loads into a cxr ``arch`` network (ModelError naming the mismatching keys if not)."""
    check_arch(arch)
    with torch.device("meta"), warnings.catch_warnings():  # keys and shapes only: no memory, no random init
        warnings.filterwarnings("ignore", message=".*meta parameter")
        CXRNet(arch, 1).load_backbone_state_dict(state, source=source)


def import_weights(
    src: Path,
    out: Path,
    *,
    arch: str = "densenet121",
    labels: list[str] | None = None,
    mean: float | None = None,
    std: float | None = None,
) -> Imported:
    """Convert ``src`` into ``out/NAME.safetensors`` and ``out/NAME.json``; nothing is written if it is refused.

    Args:
        src: a TorchXRayVision checkpoint (a pickled DenseNet) or a torchvision state dict (.pt/.pth/.safetensors).
        out: the folder the two files go to (NAME is ``src``'s stem).
        arch: the cxr architecture the weights must load into.
        labels: the source head's output order, when the checkpoint does not say it.
        mean, std: the input normalisation; default TorchXRayVision's for its checkpoints, ImageNet's grey else.
    """
    src = Path(src).expanduser()
    ckpt = read_checkpoint(src)
    _check_fits(ckpt.state, arch, str(src))
    labels = labels or ckpt.labels
    _check_labels(ckpt.state, labels, src)
    xrv = ckpt.kind != "state dict"
    blob = save({k: v.detach().contiguous().clone() for k, v in ckpt.state.items()})
    try:
        info = WeightsInfo(
            arch=arch,
            weights_sha256=hashlib.sha256(blob).hexdigest(),
            norm_mean=mean if mean is not None else (XRV_MEAN if xrv else PRETRAINED_MEAN),
            norm_std=std if std is not None else (XRV_STD if xrv else PRETRAINED_STD),
            in_channels=_first_conv_channels(ckpt.state),
            labels=labels,
            op_threshs=ckpt.op_threshs,
            source=Source(file=src.name, sha256=sha256_file(src), kind=ckpt.kind),
        )
    except ValidationError as exc:
        raise ModelError(f"cannot describe {src}: {exc.errors()[0]['loc'][0]} {exc.errors()[0]['msg']}") from None
    weights = Path(out) / f"{src.stem}.safetensors"
    atomic_write_bytes(weights, blob)
    log.info("converted %s (%s) into %s; the pickle was opened here only, by an allow-list", src, ckpt.kind, weights)
    return Imported(weights, write_info(weights, info), info)


def _check_labels(state: Mapping[str, Tensor], labels: list[str] | None, src: Path) -> None:
    head = next((state[k] for k in ("classifier.weight", "fc.weight") if k in state), None)
    if labels and head is not None and len(labels) != head.shape[0]:
        raise ModelError(f"{src} has {head.shape[0]} outputs but {len(labels)} labels were given")
