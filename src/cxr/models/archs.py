"""One spec per architecture: everything :class:`~cxr.models.networks.CXRNet` knows about a backbone, in one table.

Adding an architecture is one :class:`ArchSpec` in :data:`SPECS`: where its torchvision builder (or cxr's own
``make``) is, which conv takes the grey channel, which classifier is dropped, the trunk that runs it to its last
spatial feature map, the Grad-CAM layer, the out-of-distribution stages and the blocks ``model.freeze`` counts.
Module names are paths within the backbone (the torchvision model without its classifier).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cxr.models.small import PixelMLP, SimpleCNN

Trunk = Callable[[nn.Module, Tensor], Tensor]

# Grey equivalents of the ImageNet statistics (means of the RGB values).
PRETRAINED_MEAN = 0.449
PRETRAINED_STD = 0.226
RANDOM_MEAN = 0.5
RANDOM_STD = 0.25
# googlenet's and inception_v3's ImageNet weights were ported from TensorFlow and expect inputs in [-1, 1]
# (torchvision's transform_input=True maps ImageNet-normalised inputs back to (x - 0.5) / 0.5).
# We build them with transform_input=False, so the equivalent normalisation lives in the buffers.
GOOGLENET_PRETRAINED_MEAN = 0.5
GOOGLENET_PRETRAINED_STD = 0.5
TF_PORTED_NORM = (GOOGLENET_PRETRAINED_MEAN, GOOGLENET_PRETRAINED_STD)


@dataclass(frozen=True)
class ArchSpec:
    """What the wrapper needs to know about one backbone (module names are relative to the backbone)."""

    name: str
    trunk: Trunk  # (backbone, normalised input) -> the last spatial feature map (B, C, h, w)
    gradcam: str | None  # the module whose output that map is; None: no convolutional map, no Grad-CAM
    ood_stages: tuple[str, ...]  # where the out-of-distribution check reads feature maps; (): no check
    torchvision: str | None = None  # torchvision.models name: its ImageNet weights, and its builder unless `make`
    options: Mapping[str, Any] = field(default_factory=dict)  # the torchvision builder's extra arguments
    make: Callable[[int, int | None], nn.Module] | None = None  # (width, image_size) -> backbone with out_channels
    first_conv: str | None = None  # built for RGB: replaced by a one-channel conv; RGB checkpoints summed into it
    classifier: str | None = None  # removed from the torchvision model; its checkpoint keys dropped
    drop_prefixes: tuple[str, ...] = ()  # further checkpoint keys that are not part of the backbone (aux heads)
    rename: Callable[[str], str] | None = None  # an old checkpoint key -> today's
    blocks: tuple[str, ...] | None = None  # the modules ending each block model.freeze=N counts; None: ood_stages
    pretrained_norm: tuple[float, float] | None = (PRETRAINED_MEAN, PRETRAINED_STD)  # None: no pretrained weights
    native_size: int | None = None  # the input side its pretrained weights were trained at
    min_size: int = 1  # the smallest input side it accepts
    fixed_size: bool = False  # built for one input side: the model spec records image_size

    @property
    def freeze_blocks(self) -> tuple[str, ...]:
        return self.ood_stages if self.blocks is None else self.blocks

    @property
    def foreign_prefixes(self) -> tuple[str, ...]:
        """Checkpoint keys that are not the backbone's (the classifier, auxiliary heads)."""
        return ((f"{self.classifier}.",) if self.classifier else ()) + self.drop_prefixes


# -- trunks ------------------------------------------------------------------------------------


def in_order(*names: str) -> Trunk:
    """A trunk calling the backbone's modules ``names`` one after the other."""

    def run(m: nn.Module, x: Tensor) -> Tensor:
        for name in names:
            x = getattr(m, name)(x)
        return x

    return run


def whole(m: nn.Module, x: Tensor) -> Tensor:
    return m(x)


def features(m: nn.Module, x: Tensor) -> Tensor:
    return m.features(x)


def densenet_features(m: nn.Module, x: Tensor) -> Tensor:
    # torchvision applies an in-place ReLU here; out-of-place keeps Grad-CAM hooks on `features` valid.
    return F.relu(m.features(x))


# Old-style densenet checkpoints name layers "norm.1" instead of "norm1" (same fix as torchvision).
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def densenet_key(key: str) -> str:
    m = _DENSENET_KEY.match(key)
    return m.group(1) + m.group(2) if m else key


# -- backbones cxr builds itself ---------------------------------------------------------------


def simple_cnn(width: int, image_size: int | None) -> nn.Module:
    return SimpleCNN(width)


def pixel_mlp(width: int, image_size: int | None) -> nn.Module:
    return PixelMLP(width, int(image_size or 0))


class VGGBody(nn.Module):
    """torchvision's VGG ``features`` with its init, without the 120M-parameter classifier (never used here:
    building it cost seconds at every load); state-dict keys as torchvision's (``features.N.*``)."""

    def __init__(self, config: str) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers  # slow to import: only when a VGG is built

        self.features = make_layers(cfgs[config])
        self.out_channels = 512
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)


def vgg19(width: int, image_size: int | None) -> nn.Module:
    return VGGBody("E")


# -- the table ---------------------------------------------------------------------------------

_RESNET = in_order("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_GOOGLENET = in_order(
    "conv1",
    "maxpool1",
    "conv2",
    "conv3",
    "maxpool2",
    "inception3a",
    "inception3b",
    "maxpool3",
    "inception4a",
    "inception4b",
    "inception4c",
    "inception4d",
    "inception4e",
    "maxpool4",
    "inception5a",
    "inception5b",
)
_INCEPTION_V3 = in_order(
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "maxpool1",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "maxpool2",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
)


def _resnet(name: str) -> ArchSpec:
    return ArchSpec(
        name,
        trunk=_RESNET,
        gradcam="layer4",
        ood_stages=("layer1", "layer2", "layer3", "layer4"),
        torchvision=name,
        first_conv="conv1",
        classifier="fc",
        native_size=224,
    )


_TF_STYLE = {"aux_logits": False, "transform_input": False}  # no auxiliary head; the input transform in the buffers

# OOD stages: where the resolution or the block type changes, from the first block to the last feature map.
SPECS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec(
            "simple_cnn",
            trunk=whole,
            gradcam="blocks",
            ood_stages=("stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4"),
            make=simple_cnn,
            first_conv="stem.0",
            pretrained_norm=None,
        ),
        _resnet("resnet18"),
        _resnet("resnet34"),
        _resnet("resnet50"),
        ArchSpec(
            "densenet121",
            trunk=densenet_features,
            gradcam="features",
            ood_stages=tuple(f"features.denseblock{i}" for i in range(1, 5)),
            torchvision="densenet121",
            first_conv="features.conv0",
            classifier="classifier",
            rename=densenet_key,
            native_size=224,
        ),
        ArchSpec(
            "efficientnet_b0",
            trunk=features,
            gradcam="features",
            ood_stages=("features.2", "features.3", "features.4", "features.6", "features.8"),
            torchvision="efficientnet_b0",
            first_conv="features.0.0",
            classifier="classifier",
            native_size=224,
        ),
        ArchSpec(
            "mobilenet_v3_small",
            trunk=features,
            gradcam="features",
            ood_stages=("features.1", "features.3", "features.8", "features.12"),
            torchvision="mobilenet_v3_small",
            first_conv="features.0.0",
            classifier="classifier",
            native_size=224,
        ),
        ArchSpec(
            "googlenet",
            trunk=_GOOGLENET,
            gradcam="inception5b",
            ood_stages=("conv3", "inception3b", "inception4e", "inception5b"),
            torchvision="googlenet",
            options={**_TF_STYLE, "init_weights": True},
            first_conv="conv1.conv",
            classifier="fc",
            drop_prefixes=("aux1.", "aux2."),
            pretrained_norm=TF_PORTED_NORM,
            native_size=224,
        ),
        # The COVID-19 Radiography project's transfer model: plain VGG19 (no BatchNorm, as Keras' VGG19); the
        # stages are its five max-pool outputs. Five stride-2 pools: 32 px is the smallest input with a map left.
        ArchSpec(
            "vgg19",
            trunk=features,
            gradcam="features",
            ood_stages=("features.4", "features.9", "features.18", "features.27", "features.36"),
            torchvision="vgg19",
            make=vgg19,
            first_conv="features.0",
            drop_prefixes=("classifier.",),
            native_size=224,
            min_size=32,
        ),
        # The RSNA project's. Its valid convolutions and pools need 75 px. PyTorch's default init: torchvision's
        # truncated-normal one took seconds at every build, and every load.
        ArchSpec(
            "inception_v3",
            trunk=_INCEPTION_V3,
            gradcam="Mixed_7c",
            ood_stages=("Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7c"),
            torchvision="inception_v3",
            options={**_TF_STYLE, "init_weights": False},
            first_conv="Conv2d_1a_3x3.conv",
            classifier="fc",
            drop_prefixes=("AuxLogits.",),
            pretrained_norm=TF_PORTED_NORM,
            native_size=299,
            min_size=75,
        ),
        # The Kermany PyTorch project's baseline. No Grad-CAM and no OOD check: its hidden units have no spatial
        # extent, and the check summarises each channel's spread over the image.
        ArchSpec(
            "mlp",
            trunk=whole,
            gradcam=None,
            ood_stages=(),
            make=pixel_mlp,
            blocks=("hidden.0", "hidden.1"),
            pretrained_norm=None,
            fixed_size=True,
        ),
    )
}
ARCHS: tuple[str, ...] = tuple(SPECS)
TORCHVISION_ARCHS: tuple[str, ...] = tuple(name for name, spec in SPECS.items() if spec.torchvision)


# -- building ----------------------------------------------------------------------------------


def make_backbone(spec: ArchSpec, width: int, image_size: int | None) -> tuple[nn.Module, int]:
    """The randomly initialised backbone with a one-channel first conv and no classifier; and its feature size."""
    if spec.make is not None:
        model = spec.make(width, image_size)
        feat_dim = int(model.out_channels)
    else:
        model, feat_dim = _torchvision_body(spec)
    if spec.first_conv:
        _grey_first_conv(model, spec.first_conv)
    return model, feat_dim


def _torchvision_body(spec: ArchSpec) -> tuple[nn.Module, int]:
    import torchvision.models as tvm  # slow to import: only when a torchvision backbone is built

    model = tvm.get_model(spec.torchvision, weights=None, **spec.options)
    classifier = model.get_submodule(spec.classifier)
    linear = (
        classifier
        if isinstance(classifier, nn.Linear)
        else next(m for m in classifier.modules() if isinstance(m, nn.Linear))
    )
    setattr(model, spec.classifier, nn.Identity())
    return model, linear.in_features


def _grey_first_conv(model: nn.Module, path: str) -> None:
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    assert isinstance(old, nn.Conv2d) and old.groups == 1
    if old.in_channels == 1:  # built grey (cxr's own networks)
        return
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
