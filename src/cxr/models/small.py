"""The backbones cxr defines itself: a small grayscale CNN and a multilayer perceptron on the pixels.

Each takes ``(B, 1, H, W)`` normalised input, returns a feature map ``(B, C, h, w)`` and names ``C`` in
``out_channels`` (what :mod:`cxr.models.archs` expects of a backbone it builds with ``make``).
"""

from __future__ import annotations

from itertools import pairwise

from torch import Tensor, nn


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


class PixelMLP(nn.Module):
    """The flattened pixels through hidden layers of ``16w`` and ``8w`` units (Linear + ReLU each): the
    fully-connected baseline of the Kermany PyTorch project (512 and 256 units at the default width 32).

    Built for one input side ``image_size``; ``forward`` returns the last hidden layer as a ``(B, 8w, 1, 1)`` map,
    so the wrapper's pooling, dropout and head follow unchanged.
    """

    def __init__(self, width: int, image_size: int) -> None:
        super().__init__()
        sizes = [image_size * image_size, 16 * width, 8 * width]
        self.hidden = nn.Sequential(
            *(nn.Sequential(nn.Linear(a, b), nn.ReLU(inplace=True)) for a, b in pairwise(sizes))
        )
        self.out_channels = sizes[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.hidden(x.flatten(1))[:, :, None, None]
