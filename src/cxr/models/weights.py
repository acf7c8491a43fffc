"""Reading weights safely: local state dicts (safetensors, or torch files with ``weights_only=True``) and
torchvision's ImageNet weights from the torch hub cache (downloaded only when asked for, with a clear error offline).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from cxr.models.networks import TORCHVISION_ARCHS, WEIGHT_SUFFIXES, CXRNet, ModelError, check_arch
from cxr.models.ood import PREFIX as OOD_PREFIX
from cxr.models.weights_info import read_info


def _as_tensor_dict(obj: Any, source: str) -> dict[str, Tensor]:
    if isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if (
        not isinstance(obj, Mapping)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    ):
        raise ModelError(f"{source} is not a state dict (a mapping of parameter names to tensors)")
    sd = dict(obj)
    for prefix in ("module.", "_orig_mod."):  # DataParallel / torch.compile wrappers
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a ``.safetensors`` or ``.pt/.pth/.bin/.ckpt`` state dict safely (``weights_only=True``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ModelError(f"unsupported weights file {path}: expected one of {', '.join(WEIGHT_SUFFIXES)}")
    if suffix == ".safetensors":
        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:
            raise ModelError(f"could not read safetensors file {path}: {exc}") from exc
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ModelError(
                f"refusing to load {path}: it contains Python objects other than tensors and only "
                f"weights_only=True loading is allowed; save a plain state_dict or a .safetensors file "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            ) from exc
        except Exception as exc:
            raise ModelError(f"could not read weights file {path}: {type(exc).__name__}: {exc}") from exc
    return _as_tensor_dict(obj, str(path))


def _imagenet_weights(arch: str) -> Any:
    import torchvision.models as tvm

    if arch not in TORCHVISION_ARCHS:
        raise ModelError(f"no pretrained weights for {arch}")
    return tvm.get_model_weights(arch).DEFAULT


def imagenet_weights_url(arch: str) -> str:
    """URL of torchvision's default ImageNet weights for ``arch``."""
    return str(_imagenet_weights(arch).url)


def imagenet_weights_path(arch: str) -> Path:
    """Where the ImageNet weights for ``arch`` are looked up: ``torch.hub.get_dir()/checkpoints/<file>``."""
    url = imagenet_weights_url(arch)
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1].split("?")[0]


def load_imagenet_state_dict(arch: str) -> dict[str, Tensor]:
    """torchvision's ImageNet state dict for ``arch``: from the torch hub cache, else downloaded (hash checked)."""
    check_arch(arch)
    url = imagenet_weights_url(arch)
    path = imagenet_weights_path(arch)
    if path.is_file():
        try:
            return read_state_dict(path)
        except ModelError as exc:
            raise ModelError(f"{exc}; delete it and fetch it again from {url}") from exc
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        obj = torch.hub.load_state_dict_from_url(
            url,
            model_dir=str(path.parent),
            map_location="cpu",
            progress=False,
            check_hash=True,
            file_name=path.name,
            weights_only=True,
        )
    except Exception as exc:
        raise ModelError(
            f"ImageNet weights for {arch} are not cached and could not be downloaded "
            f"({type(exc).__name__}: {exc}). Download {url} and place it at {path} "
            f"(torch hub dir: set TORCH_HOME to change it), or use weights='none' or a local file."
        ) from exc
    return _as_tensor_dict(obj, url)


def _is_cxrnet_state(sd: Mapping[str, Tensor]) -> bool:
    return "head.weight" in sd or "norm_mean" in sd or any(k.startswith("backbone.") for k in sd)


def load_weights(model: CXRNet, weights: str | Path) -> CXRNet:
    """Load a local weights file into ``model`` (in place) and return it.

    A file whose keys start with ``backbone.``/``head.`` is a full CXRNet state dict (its
    normalisation buffers are loaded too); anything else is a torchvision backbone state dict. A
    ``.safetensors`` written by ``cxr import-weights`` has a JSON beside it whose normalisation is applied.
    """
    path = Path(weights).expanduser()
    # a trained cxr model's model.safetensors also holds its OOD check's statistics: not the network's weights
    sd = {k: v for k, v in read_state_dict(path).items() if not k.startswith(OOD_PREFIX)}
    info = read_info(path, model.arch)  # `cxr import-weights`' JSON beside the file: the input it was trained on
    if _is_cxrnet_state(sd):
        model.load_full_state_dict(sd, source=str(path))
    else:
        model.load_backbone_state_dict(sd, source=str(path))
    if info is not None:
        model.norm_mean.fill_(info.norm_mean)
        model.norm_std.fill_(info.norm_std)
    return model
