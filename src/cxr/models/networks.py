"""The one wrapper every network is: :class:`CXRNet` around a backbone described by its spec (:mod:`cxr.models.archs`).

Every model is a :class:`CXRNet`:

* input: float tensor ``(B, 1, H, W)`` with values in ``[0, 1]``;
* a normalisation step stored as buffers (``norm_mean``/``norm_std``), so a saved state dict is
  self-contained: ImageNet-pretrained backbones use the grey equivalent of the ImageNet statistics
  (mean 0.449, std 0.226), random init uses 0.5 / 0.25;
* a backbone ``trunk`` producing the last spatial feature map, global average pooling, dropout and
  a linear head (``n_outputs`` logits: 1 for binary, K for multiclass / multilabel);
* optional tabular fusion: with ``n_tabular > 0`` ``forward(x, tabular)`` concatenates a small MLP
  embedding of the ``(B, n_tabular)`` vector with the image features before the head.

Weights: ``"none"`` (random init), ``"imagenet"`` (torchvision's default weights, read from the
torch hub cache or downloaded; never a silent fallback to random init) or a path to a local
``.safetensors`` / ``.pt`` / ``.pth`` state dict (of the torchvision backbone, whose 3-channel first
conv is summed over RGB, or of a full CXRNet). Pickle files are only read with
``torch.load(weights_only=True)``.

A model is rebuilt without pickle from its JSON-serialisable :attr:`CXRNet.spec` with
:func:`build_from_spec`, then its weights are loaded by the caller (e.g. from safetensors).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from cxr.errors import UserError
from cxr.models.archs import (
    ARCHS,
    PRETRAINED_MEAN,
    PRETRAINED_STD,
    RANDOM_MEAN,
    RANDOM_STD,
    SPECS,
    TORCHVISION_ARCHS,
    ArchSpec,
    make_backbone,
)
from cxr.models.small import SimpleCNN

logger = logging.getLogger(__name__)

__all__ = [  # the names other modules have always imported from here
    "ARCHS",
    "PRETRAINED_MEAN",
    "PRETRAINED_STD",
    "RANDOM_MEAN",
    "RANDOM_STD",
    "SPEC_KEYS",
    "TORCHVISION_ARCHS",
    "WEIGHT_SUFFIXES",
    "CXRNet",
    "ModelError",
    "SimpleCNN",
    "arch_spec",
    "check_arch",
    "check_input_size",
    "check_params",
]

TABULAR_EMBED_DIM = 32
SPEC_KEYS: tuple[str, ...] = ("arch", "n_outputs", "dropout", "width", "n_tabular", "norm_mean", "norm_std")
OPTIONAL_SPEC_KEYS: tuple[str, ...] = ("image_size",)  # only in the specs of archs built for one input side
WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class ModelError(UserError):
    """A user-facing model problem (unknown arch, unusable weights, wrong inputs)."""


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise ModelError(
            f"unknown model arch {arch!r}; valid names: {', '.join(ARCHS)}, logistic_regression (baseline)"
        )
    return arch


def arch_spec(arch: str) -> ArchSpec:
    return SPECS[check_arch(arch)]


def check_input_size(arch: str, size: int) -> int:
    """``size`` if ``arch`` accepts square inputs of that side, else one line naming the smallest it does."""
    spec = arch_spec(arch)
    if size < spec.min_size:
        native = f" (its pretrained weights were trained at {spec.native_size} px)" if spec.native_size else ""
        raise ModelError(
            f"{arch} needs inputs of at least {spec.min_size} px{native}, got {size}: "
            f"set model.image_size >= {spec.min_size} (and add it to prepare.sizes)"
        )
    return size


def _short_float(v: float) -> float:
    """Shortest decimal that maps back to the same float32 (keeps specs readable: 0.449, not 0.44900000095)."""
    v32 = torch.tensor(v, dtype=torch.float32).item()
    for digits in range(6, 10):
        s = float(f"{v32:.{digits}g}")
        if torch.tensor(s, dtype=torch.float32).item() == v32:
            return s
    return v32


class CXRNet(nn.Module):
    """Normalisation -> backbone trunk -> global average pool -> [tabular fusion] -> dropout -> linear head.

    Attributes:
        arch, n_outputs, dropout_p, width, n_tabular: construction parameters (see :attr:`spec`).
        norm_mean, norm_std: ``(1, 1, 1, 1)`` buffers applied to the ``[0, 1]`` input.
        backbone: the feature extractor (``SimpleCNN`` or the torchvision model without classifier).
        tabular: MLP embedding of the tabular vector (``None`` when ``n_tabular == 0``).
        head: ``nn.Linear(feature_dim [+ 32], n_outputs)``.
        feature_dim: size of the pooled image feature vector returned by :meth:`features`.
        gradcam_layer: dotted module name (``model.get_submodule(name)``) whose output is the last
            spatial feature map, e.g. ``"backbone.layer4"``; :attr:`gradcam_module` is the module. ``None`` for
            an arch without a convolutional map (``mlp``), which then has no ``gradcam_module`` attribute.
        arch_spec: the architecture's :class:`~cxr.models.archs.ArchSpec`.
        image_size: the input side of an arch built for one (``mlp``), else ``None``.
    """

    def __init__(
        self,
        arch: str,
        n_outputs: int,
        *,
        dropout: float = 0.2,
        width: int = 32,
        n_tabular: int = 0,
        norm_mean: float = RANDOM_MEAN,
        norm_std: float = RANDOM_STD,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        self.arch_spec = spec = arch_spec(arch)
        check_params(n_outputs, dropout, width, n_tabular)
        if spec.fixed_size and image_size is None:
            raise ModelError(f"{arch} is built for one input size: give its image_size (model.image_size)")
        if image_size is not None:
            check_input_size(arch, int(image_size))
        if not (math.isfinite(norm_std) and norm_std > 0 and math.isfinite(norm_mean)):
            raise ModelError(f"invalid normalisation mean={norm_mean} std={norm_std}")
        self.arch = arch
        self.n_outputs = int(n_outputs)
        self.dropout_p = float(dropout)
        self.width = int(width)
        self.n_tabular = int(n_tabular)
        self.image_size = int(image_size) if spec.fixed_size else None
        self.register_buffer("norm_mean", torch.full((1, 1, 1, 1), float(norm_mean)))
        self.register_buffer("norm_std", torch.full((1, 1, 1, 1), float(norm_std)))

        self.backbone, self.feature_dim = make_backbone(spec, self.width, self.image_size)
        self._trunk = spec.trunk
        self.gradcam_layer = f"backbone.{spec.gradcam}" if spec.gradcam else None

        if self.n_tabular > 0:
            self.tabular: nn.Module | None = nn.Sequential(
                nn.Linear(self.n_tabular, TABULAR_EMBED_DIM),
                nn.ReLU(inplace=True),
                nn.Linear(TABULAR_EMBED_DIM, TABULAR_EMBED_DIM),
                nn.ReLU(inplace=True),
            )
            head_in = self.feature_dim + TABULAR_EMBED_DIM
        else:
            self.tabular = None
            head_in = self.feature_dim
        self.dropout = nn.Dropout(self.dropout_p)
        self.head = nn.Linear(head_in, self.n_outputs)

    # -- forward ------------------------------------------------------------------------------

    def normalize(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ModelError(f"expected input of shape (B, 1, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ModelError(f"expected a float input scaled to [0, 1], got dtype {x.dtype}")
        if self.image_size is not None and tuple(x.shape[2:]) != (self.image_size, self.image_size):
            raise ModelError(
                f"this {self.arch} takes {self.image_size}x{self.image_size} inputs, got {tuple(x.shape[2:])}"
            )
        if min(x.shape[2:]) < self.arch_spec.min_size:
            check_input_size(self.arch, min(x.shape[2:]))
        return (x - self.norm_mean) / self.norm_std

    def feature_map(self, x: Tensor) -> Tensor:
        """Last spatial feature map ``(B, C, h, w)`` (the output of :attr:`gradcam_layer`, ReLU'd for densenet)."""
        return self._trunk(self.backbone, self.normalize(x))

    def features(self, x: Tensor) -> Tensor:
        """Pooled image features ``(B, feature_dim)``."""
        return self.feature_map(x).mean(dim=(2, 3))

    def forward(self, x: Tensor, tabular: Tensor | None = None) -> Tensor:
        feats = self.features(x)
        if self.tabular is not None:
            if tabular is None:
                raise ModelError(f"this model fuses {self.n_tabular} tabular features: call model(x, tabular)")
            if tabular.ndim != 2 or tabular.shape != (feats.shape[0], self.n_tabular):
                raise ModelError(
                    f"expected tabular input of shape ({feats.shape[0]}, {self.n_tabular}), got {tuple(tabular.shape)}"
                )
            feats = torch.cat([feats, self.tabular(tabular.to(feats.dtype))], dim=1)
        elif tabular is not None and tabular.numel() > 0:
            raise ModelError("this model has no tabular input (n_tabular=0) but tabular features were given")
        return self.head(self.dropout(feats))

    # -- introspection ------------------------------------------------------------------------

    @property
    def ood_stages(self) -> list[str]:
        """Modules (names within this model) whose outputs the out-of-distribution score summarises."""
        return [f"backbone.{stage}" for stage in self.arch_spec.ood_stages]

    @property
    def blocks(self) -> list[str]:
        """The modules (names within this model) ending each block that ``model.freeze=N`` counts, in order."""
        return [f"backbone.{block}" for block in self.arch_spec.freeze_blocks]

    @property
    def gradcam_module(self) -> nn.Module:
        if self.gradcam_layer is None:  # AttributeError: hasattr(model, "gradcam_module") is False, as for the baseline
            raise AttributeError(f"a {self.arch} has no convolutional feature map")
        return self.get_submodule(self.gradcam_layer)

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description; ``build_from_spec(model.spec)`` rebuilds the architecture."""
        spec = {
            "arch": self.arch,
            "n_outputs": self.n_outputs,
            "dropout": self.dropout_p,
            "width": self.width,
            "n_tabular": self.n_tabular,
            "norm_mean": _short_float(float(self.norm_mean.flatten()[0].item())),
            "norm_std": _short_float(float(self.norm_std.flatten()[0].item())),
        }
        return spec if self.image_size is None else {**spec, "image_size": self.image_size}

    def extra_repr(self) -> str:
        return f"arch={self.arch}, n_outputs={self.n_outputs}, n_tabular={self.n_tabular}"

    # -- weight loading -----------------------------------------------------------------------

    def load_backbone_state_dict(self, state: Mapping[str, Tensor], source: str = "state dict") -> None:
        """Load a torchvision-style backbone state dict (3- or 1-channel first conv; classifier keys ignored)."""
        spec = self.arch_spec
        rename = spec.rename or str
        sd = {rename(key): value for key, value in state.items() if not key.startswith(spec.foreign_prefixes)}
        first_conv = f"{spec.first_conv}.weight"
        w = sd.get(first_conv) if spec.first_conv else None
        if w is not None and w.ndim == 4 and w.shape[1] == 3:
            # grey image replicated on RGB gives the same activations as the summed kernel on grey
            sd[first_conv] = w.sum(dim=1, keepdim=True)
        _load_checked(self.backbone, sd, source, self.arch, optional=())

    def load_full_state_dict(self, state: Mapping[str, Tensor], source: str = "state dict") -> None:
        """Load a CXRNet state dict. Missing or differently-shaped ``head.*``/``tabular.*`` tensors are
        re-initialised with a warning (transfer to another label set); anything else must match."""
        _load_checked(self, dict(state), source, self.arch, optional=("head.", "tabular."))


def check_params(n_outputs: int, dropout: float, width: int, n_tabular: int) -> None:
    if int(n_outputs) != n_outputs or n_outputs < 1:
        raise ModelError(f"n_outputs must be a positive integer, got {n_outputs!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ModelError(f"dropout must be in [0, 1), got {dropout!r}")
    if int(width) != width or width < 4:
        raise ModelError(f"width must be an integer >= 4, got {width!r}")
    if int(n_tabular) != n_tabular or n_tabular < 0:
        raise ModelError(f"n_tabular must be an integer >= 0, got {n_tabular!r}")


def _few(keys: list[str], n: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _load_checked(module: nn.Module, sd: dict[str, Tensor], source: str, arch: str, optional: tuple[str, ...]) -> None:
    target = module.state_dict()
    missing = [k for k in target if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in target]
    mismatched = [k for k in sd if k in target and tuple(sd[k].shape) != tuple(target[k].shape)]

    skipped = [k for k in missing + unexpected + mismatched if optional and k.startswith(optional)]
    missing = [k for k in missing if k not in skipped]
    unexpected = [k for k in unexpected if k not in skipped]
    mismatched_hard = [k for k in mismatched if k not in skipped]
    if missing or unexpected or mismatched_hard:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
        if mismatched_hard:
            shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}" for k in mismatched_hard]
            parts.append(f"{len(shapes)} shape mismatches ({_few(shapes, 3)})")
        raise ModelError(f"weights from {source} do not fit arch {arch!r}: " + "; ".join(parts))

    if skipped:
        logger.warning(
            "weights from %s: re-initialising %s (missing or different shape in the file)",
            source,
            _few(skipped),
        )
    sd = {k: v for k, v in sd.items() if k not in skipped}
    for k in target:  # old checkpoints predate BatchNorm's num_batches_tracked
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros((), dtype=torch.long)
    try:
        module.load_state_dict(sd, strict=not skipped)
    except RuntimeError as exc:  # pragma: no cover - shapes and keys were checked above
        raise ModelError(f"weights from {source} do not fit arch {arch!r}: {exc}") from exc
