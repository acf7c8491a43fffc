"""Opening a pickled checkpoint that holds whole modules (a TorchXRayVision DenseNet) without running its code.

The one place cxr unpickles more than tensors (``cxr import-weights`` is its only caller). Only the globals such a
checkpoint holds are allowed, and every module class among them becomes an inert stand-in (:class:`StandIn`: it
keeps the tensors and attributes, runs none of the original code; torchxrayvision need not be installed). Anything
else (``os.system``, an unknown class) is refused before it is called. Files in torch's zip format are read by
``torch.load(weights_only=True)`` with this allow-list; files in the legacy format (torch < 1.6, which
TorchXRayVision's 2020 release files use, and weights_only cannot read) by a pickle Unpickler whose ``find_class``
knows the same allow-list and nothing else.
"""

from __future__ import annotations

import collections
import functools
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.backends.thnn import _get_thnn_function_backend

from cxr.models.networks import ModelError

DENSENET_CLASSES = ("DenseNet", "_DenseBlock", "_DenseLayer", "_Transition")
_TORCH_MODULES = {
    "container": ("Sequential",),
    "conv": ("Conv2d",),
    "batchnorm": ("BatchNorm2d",),
    "activation": ("ReLU",),
    "pooling": ("MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d"),
    "linear": ("Linear",),
    "dropout": ("Dropout",),
}
_ZIP_MAGIC = b"PK\x03\x04"


class StandIn(nn.Module):
    """What every allowed module class of a checkpoint becomes: its tensors and attributes, none of its code."""


def module_names() -> list[str]:
    """The module classes a TorchXRayVision DenseNet checkpoint holds (its own, or torchvision's blocks)."""
    xrv = [f"torchxrayvision.models.{c}" for c in DENSENET_CLASSES]
    tv = [f"torchvision.models.densenet.{c}" for c in DENSENET_CLASSES]
    nn_ = [f"torch.nn.modules.{m}.{c}" for m, classes in _TORCH_MODULES.items() for c in classes]
    return xrv + tv + nn_


@functools.cache  # built once: find_class asks for every global in the file
def _allowed() -> dict[str, Any]:
    """Full name -> what it unpickles as. Beyond the stand-ins: what torch.save writes for tensors and modules."""
    return {
        **{name: StandIn for name in module_names()},
        # modules pickled by torch < 1.5 carry `_backend = _get_thnn_function_backend()`, a no-op kept for them
        "torch.nn.backends.thnn._get_thnn_function_backend": _get_thnn_function_backend,
        "collections.OrderedDict": collections.OrderedDict,
        "builtins.set": set,
        "__builtin__.set": set,  # its name in the protocol-2 pickles torch.save writes
        "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    }


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _allowed().get(f"{module}.{name}")
        if found is None:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name} is not allowed")
        return found


class _LegacyPickle:
    """The ``pickle_module`` torch.load reads a legacy-format file with: only :class:`_Unpickler`."""

    Unpickler = _Unpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _Unpickler(file, **kwargs).load()


def load_checkpoint(path: Path) -> Any:
    """The object pickled in ``path`` (module classes as :class:`StandIn`); ModelError if it holds anything else."""
    with open(path, "rb") as fh:
        zipped = fh.read(4) == _ZIP_MAGIC
    try:
        with warnings.catch_warnings():  # the legacy format compares a module's pickled source with a stand-in's
            warnings.simplefilter("ignore")
            if zipped:
                with torch.serialization.safe_globals([(found, name) for name, found in _allowed().items()]):
                    return torch.load(path, map_location="cpu", weights_only=True)
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_LegacyPickle)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"refusing {path}: it holds Python objects other than a TorchXRayVision DenseNet or a state dict, "
            f"and nothing else is unpickled ({_global_line(exc)})"
        ) from None
    except Exception as exc:
        raise ModelError(f"could not read checkpoint {path}: {type(exc).__name__}: {_global_line(exc)}") from None


def _global_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines() or [""]
    return next((line for line in lines if "GLOBAL" in line), lines[0])
