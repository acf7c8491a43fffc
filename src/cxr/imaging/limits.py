"""What the reader returns and refuses: the Image, the read limits, the one error type."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxr.errors import UserError

DEFAULT_MIN_SIDE = 16


DEFAULT_MAX_PIXELS = 60_000_000


DEFAULT_MAX_BYTES = 200 * 1024 * 1024


HeaderCheck = Callable[[dict[str, Any]], None]


class ImageReadError(UserError):
    """The input is not a usable single-frame grayscale radiograph; the message says why."""


@dataclass(frozen=True)
class ReadLimits:
    min_side: int = DEFAULT_MIN_SIDE
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES


@dataclass
class Image:
    pixels: np.ndarray  # float32, (H, W), display orientation
    meta: dict[str, Any] = field(default_factory=dict)


def check_size(rows: int, cols: int, limits: ReadLimits, label: str) -> None:
    """Refuse before decoding: a tiny header can announce a huge image (decompression bomb)."""
    if rows * cols > limits.max_pixels:
        raise ImageReadError(f"{label}: {cols}x{rows} pixels exceeds the limit of {limits.max_pixels} pixels")
    if min(rows, cols) < limits.min_side:
        raise ImageReadError(f"{label}: {cols}x{rows} is below the minimum side of {limits.min_side} pixels")


def check_pixels(pixels: np.ndarray, limits: ReadLimits, label: str) -> None:
    if pixels.ndim != 2:
        raise ImageReadError(f"{label}: expected a single grayscale frame, got array shape {pixels.shape}")
    if not np.isfinite(pixels).all():
        raise ImageReadError(f"{label}: pixel data contains NaN or infinite values")
    if float(pixels.max()) == float(pixels.min()):
        raise ImageReadError(f"{label}: image is constant (every pixel is {float(pixels.min()):g})")
