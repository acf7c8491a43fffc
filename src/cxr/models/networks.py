"""Model zoo: a small grayscale CNN and single-channel torchvision backbones behind one wrapper.

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
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cxr.errors import UserError

logger = logging.getLogger(__name__)

ARCHS: tuple[str, ...] = (
    "simple_cnn",
    "resnet18",
    "resnet34",
    "resnet50",
    "densenet121",
    "efficientnet_b0",
    "mobilenet_v3_small",
    "googlenet",
)
TORCHVISION_ARCHS: tuple[str, ...] = ARCHS[1:]

# Grey equivalents of the ImageNet statistics (means of the RGB values).
PRETRAINED_MEAN = 0.449
PRETRAINED_STD = 0.226
RANDOM_MEAN = 0.5
RANDOM_STD = 0.25
# googlenet's ImageNet weights were ported from TensorFlow and expect inputs in [-1, 1]
# (torchvision's transform_input=True maps ImageNet-normalised inputs back to (x - 0.5) / 0.5).
# We build it with transform_input=False, so the equivalent normalisation lives in the buffers.
GOOGLENET_PRETRAINED_MEAN = 0.5
GOOGLENET_PRETRAINED_STD = 0.5

TABULAR_EMBED_DIM = 32
SPEC_KEYS: tuple[str, ...] = ("arch", "n_outputs", "dropout", "width", "n_tabular", "norm_mean", "norm_std")
WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class ModelError(UserError):
    """A user-facing model problem (unknown arch, unusable weights, wrong inputs)."""


# ---------------------------------------------------------------------------------------------
# simple_cnn
# ---------------------------------------------------------------------------------------------


class ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class DepthwiseSeparable(nn.Sequential):
    """Depthwise 3x3 (stride 1 or 2) -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU (MobileNet v1 block)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__(
            ConvBNReLU(c_in, c_in, 3, stride, groups=c_in),
            ConvBNReLU(c_in, c_out, 1),
        )


class SimpleCNN(nn.Module):
    """Small grayscale CNN: a plain 3x3 conv stem then 5 depthwise-separable blocks (3 of them stride 2).

    Channels: ``w -> 2w -> 2w -> 4w -> 4w -> 8w``; ``forward`` returns the last feature map
    (``8w`` channels, spatial size ``ceil(H / 8)``: 4x4 at 28 px, 8x8 at 64 px).
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        # Full-resolution stem: at 28 px a stride-2 stem throws away half the detail (measured on
        # PneumoniaMNIST: test AUROC 0.96-0.97 with it, see benchmarks/README.md).
        self.stem = ConvBNReLU(1, w, 3, stride=1)
        self.blocks = nn.Sequential(
            DepthwiseSeparable(w, 2 * w, stride=2),
            DepthwiseSeparable(2 * w, 2 * w),
            DepthwiseSeparable(2 * w, 4 * w, stride=2),
            DepthwiseSeparable(4 * w, 4 * w),
            DepthwiseSeparable(4 * w, 8 * w, stride=2),
        )
        self.out_channels = 8 * w
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x))


# ---------------------------------------------------------------------------------------------
# torchvision backbones
# ---------------------------------------------------------------------------------------------


def _family(arch: str) -> str:
    if arch.startswith("resnet"):
        return "resnet"
    if arch.startswith("densenet"):
        return "densenet"
    if arch.startswith("efficientnet") or arch.startswith("mobilenet"):
        return "features"
    return arch  # simple_cnn, googlenet


# Per arch: the first conv (replaced by a 1-channel conv), the classifier attribute removed, and
# the module whose output is the last spatial feature map (Grad-CAM target), all relative to the
# torchvision model.
_FIRST_CONV = {
    "resnet18": "conv1",
    "resnet34": "conv1",
    "resnet50": "conv1",
    "densenet121": "features.conv0",
    "efficientnet_b0": "features.0.0",
    "mobilenet_v3_small": "features.0.0",
    "googlenet": "conv1.conv",
}
_CLASSIFIER = {
    "resnet18": "fc",
    "resnet34": "fc",
    "resnet50": "fc",
    "densenet121": "classifier",
    "efficientnet_b0": "classifier",
    "mobilenet_v3_small": "classifier",
    "googlenet": "fc",
}
_GRADCAM = {
    "simple_cnn": "blocks",
    "resnet18": "layer4",
    "resnet34": "layer4",
    "resnet50": "layer4",
    "densenet121": "features",
    "efficientnet_b0": "features",
    "mobilenet_v3_small": "features",
    "googlenet": "inception5b",
}
# The stages whose outputs the out-of-distribution score summarises (cxr.models.ood), relative to the backbone:
# where the resolution or the block type changes, from the first block to the last feature map.
_OOD_STAGES = {
    "simple_cnn": ("stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4"),
    "resnet18": ("layer1", "layer2", "layer3", "layer4"),
    "resnet34": ("layer1", "layer2", "layer3", "layer4"),
    "resnet50": ("layer1", "layer2", "layer3", "layer4"),
    "densenet121": ("features.denseblock1", "features.denseblock2", "features.denseblock3", "features.denseblock4"),
    "efficientnet_b0": ("features.2", "features.3", "features.4", "features.6", "features.8"),
    "mobilenet_v3_small": ("features.1", "features.3", "features.8", "features.12"),
    "googlenet": ("conv3", "inception3b", "inception4e", "inception5b"),
}
# Keys of a torchvision checkpoint that are not part of our backbone (classifier, googlenet aux heads).
_DROP_PREFIXES = {
    "resnet18": ("fc.",),
    "resnet34": ("fc.",),
    "resnet50": ("fc.",),
    "densenet121": ("classifier.",),
    "efficientnet_b0": ("classifier.",),
    "mobilenet_v3_small": ("classifier.",),
    "googlenet": ("fc.", "aux1.", "aux2."),
}
# Old-style densenet checkpoints name layers "norm.1" instead of "norm1" (same fix as torchvision).
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _torchvision_model(arch: str) -> tuple[nn.Module, int]:
    """Random-init torchvision model with a 1-channel first conv and no classifier; returns (model, feature dim)."""
    import torchvision.models as tvm

    if arch == "googlenet":
        model = tvm.googlenet(weights=None, aux_logits=False, transform_input=False, init_weights=True)
    else:
        model = getattr(tvm, arch)(weights=None)

    classifier = getattr(model, _CLASSIFIER[arch])
    linear = (
        classifier
        if isinstance(classifier, nn.Linear)
        else next(m for m in classifier.modules() if isinstance(m, nn.Linear))
    )
    feat_dim = linear.in_features
    setattr(model, _CLASSIFIER[arch], nn.Identity())

    parent_name, _, attr = _FIRST_CONV[arch].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    assert isinstance(old, nn.Conv2d) and old.groups == 1
    new = nn.Conv2d(
        1,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        old.dilation,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    with torch.no_grad():  # keep the arch's own init scheme (its fan_out does not depend on C_in)
        new.weight.copy_(old.weight[:, :1])
        if old.bias is not None:
            new.bias.copy_(old.bias)
    setattr(parent, attr, new)
    return model, feat_dim


def _resnet_trunk(m: nn.Module, x: Tensor) -> Tensor:
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return m.layer4(m.layer3(m.layer2(m.layer1(x))))


def _densenet_trunk(m: nn.Module, x: Tensor) -> Tensor:
    # torchvision applies an in-place ReLU here; out-of-place keeps Grad-CAM hooks on `features` valid.
    return F.relu(m.features(x))


def _features_trunk(m: nn.Module, x: Tensor) -> Tensor:
    return m.features(x)


def _googlenet_trunk(m: nn.Module, x: Tensor) -> Tensor:
    x = m.maxpool1(m.conv1(x))
    x = m.maxpool2(m.conv3(m.conv2(x)))
    x = m.maxpool3(m.inception3b(m.inception3a(x)))
    x = m.inception4e(m.inception4d(m.inception4c(m.inception4b(m.inception4a(x)))))
    x = m.maxpool4(x)
    return m.inception5b(m.inception5a(x))


def _simple_trunk(m: nn.Module, x: Tensor) -> Tensor:
    return m(x)


_TRUNKS: dict[str, Callable[[nn.Module, Tensor], Tensor]] = {
    "resnet": _resnet_trunk,
    "densenet": _densenet_trunk,
    "features": _features_trunk,
    "googlenet": _googlenet_trunk,
    "simple_cnn": _simple_trunk,
}


# ---------------------------------------------------------------------------------------------
# The wrapper
# ---------------------------------------------------------------------------------------------


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise ModelError(
            f"unknown model arch {arch!r}; valid names: {', '.join(ARCHS)}, logistic_regression (baseline)"
        )
    return arch


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
            spatial feature map, e.g. ``"backbone.layer4"``; :attr:`gradcam_module` is the module.
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
    ) -> None:
        super().__init__()
        check_arch(arch)
        check_params(n_outputs, dropout, width, n_tabular)
        if not (math.isfinite(norm_std) and norm_std > 0 and math.isfinite(norm_mean)):
            raise ModelError(f"invalid normalisation mean={norm_mean} std={norm_std}")
        self.arch = arch
        self.n_outputs = int(n_outputs)
        self.dropout_p = float(dropout)
        self.width = int(width)
        self.n_tabular = int(n_tabular)
        self.register_buffer("norm_mean", torch.full((1, 1, 1, 1), float(norm_mean)))
        self.register_buffer("norm_std", torch.full((1, 1, 1, 1), float(norm_std)))

        if arch == "simple_cnn":
            self.backbone: nn.Module = SimpleCNN(self.width)
            self.feature_dim = self.backbone.out_channels
        else:
            self.backbone, self.feature_dim = _torchvision_model(arch)
        self._trunk = _TRUNKS[_family(arch)]
        self.gradcam_layer = f"backbone.{_GRADCAM[arch]}"

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
        return [f"backbone.{stage}" for stage in _OOD_STAGES[self.arch]]

    @property
    def gradcam_module(self) -> nn.Module:
        return self.get_submodule(self.gradcam_layer)

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description; ``build_from_spec(model.spec)`` rebuilds the architecture."""
        return {
            "arch": self.arch,
            "n_outputs": self.n_outputs,
            "dropout": self.dropout_p,
            "width": self.width,
            "n_tabular": self.n_tabular,
            "norm_mean": _short_float(float(self.norm_mean.flatten()[0].item())),
            "norm_std": _short_float(float(self.norm_std.flatten()[0].item())),
        }

    def extra_repr(self) -> str:
        return f"arch={self.arch}, n_outputs={self.n_outputs}, n_tabular={self.n_tabular}"

    # -- weight loading -----------------------------------------------------------------------

    def load_backbone_state_dict(self, state: Mapping[str, Tensor], source: str = "state dict") -> None:
        """Load a torchvision-style backbone state dict (3- or 1-channel first conv; classifier keys ignored)."""
        if self.arch == "simple_cnn":
            prefix_drop: tuple[str, ...] = ()
            first_conv = "stem.0.weight"
        else:
            prefix_drop = _DROP_PREFIXES[self.arch]
            first_conv = f"{_FIRST_CONV[self.arch]}.weight"
        sd: dict[str, Tensor] = {}
        for key, value in state.items():
            if key.startswith(prefix_drop):
                continue
            if self.arch.startswith("densenet"):
                m = _DENSENET_KEY.match(key)
                if m:
                    key = m.group(1) + m.group(2)
            sd[key] = value
        w = sd.get(first_conv)
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
