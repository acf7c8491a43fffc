"""A patient's fixed anatomy and how faint a case is: the parameters a film is rendered from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

View = Literal["PA", "AP"]


Sex = Literal["M", "F"]


@dataclass(frozen=True)
class Anatomy:
    """A patient's body, in normalised image coordinates (x right, y down, both in [-1, 1])."""

    body_w: float = 0.86  # half-width of the thorax
    neck_w: float = 0.22
    shoulder_y: float = -0.80
    body_density: float = 0.55
    lung_cx: tuple[float, float] = (-0.37, 0.36)  # image left (patient right), image right
    lung_cy: float = -0.12
    lung_a: tuple[float, float] = (0.30, 0.28)
    lung_b: float = 0.58
    lung_depth: float = 0.36
    dome_y: tuple[float, float] = (0.36, 0.40)  # the right hemidiaphragm (image left) sits higher
    dome_h: float = 0.12
    mediastinum_w: float = 0.09
    heart_c: tuple[float, float] = (0.12, 0.19)
    heart_ab: tuple[float, float] = (0.35, 0.23)
    heart_density: float = 0.10
    rib_top: float = -0.74
    rib_spacing: float = 0.088
    rib_density: float = 0.07
    clavicle_y: float = -0.62
    breast: float = 0.0  # density of the breast shadows (0 = none)
    breast_c: tuple[float, float] = (0.46, 0.27)
    nipples: bool = False
    gastric_bubble: float = 0.0
    vessel_density: float = 0.05


def sample_anatomy(rng: np.random.Generator, sex: Sex = "M", difficulty: float = 0.6) -> Anatomy:
    """A random, plausible anatomy; its variability grows with ``difficulty``."""
    v = 0.6 + 0.48 * float(np.clip(difficulty, 0.0, 1.0))  # anatomic variability factor

    def u(lo: float, hi: float) -> float:
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        return float(mid + half * v * rng.uniform(-1.0, 1.0))

    female = sex == "F"
    body_w = u(0.80, 0.92) - (0.04 if female else 0.0)
    lung_scale = u(0.93, 1.07)
    dome = u(0.32, 0.42)
    heart_scale = u(0.9, 1.12)
    return Anatomy(
        body_w=body_w,
        neck_w=u(0.18, 0.25),
        shoulder_y=u(-0.84, -0.76),
        body_density=u(0.48, 0.62),
        lung_cx=(-u(0.34, 0.40), u(0.33, 0.39)),
        lung_cy=u(-0.15, -0.09),
        lung_a=(0.30 * lung_scale * u(0.95, 1.05), 0.28 * lung_scale * u(0.95, 1.05)),
        lung_b=0.58 * lung_scale,
        lung_depth=u(0.30, 0.40),
        dome_y=(dome, dome + u(0.01, 0.07)),
        dome_h=u(0.09, 0.15),
        mediastinum_w=u(0.075, 0.105),
        heart_c=(u(0.09, 0.15), dome - u(0.15, 0.21)),
        heart_ab=(0.35 * heart_scale, 0.23 * heart_scale),
        heart_density=u(0.07, 0.13),
        rib_top=u(-0.77, -0.71),
        rib_spacing=u(0.080, 0.096),
        rib_density=u(0.05, 0.09),
        clavicle_y=u(-0.66, -0.58),
        breast=u(0.04, 0.11) if female else 0.0,
        breast_c=(u(0.42, 0.50), u(0.22, 0.32)),
        nipples=bool(rng.random() < (0.5 if female else 0.15)),
        gastric_bubble=u(0.06, 0.16) if rng.random() < 0.6 else 0.0,
        vessel_density=u(0.035, 0.065),
    )


@dataclass(frozen=True)
class Severity:
    """How ``difficulty`` turns into lesion and nuisance strengths."""

    lesion_contrast: float
    lesion_size: float
    lesion_count: float  # mean number of extra lesions beyond the first
    noise: float
    distractor: float
    exposure: float

    @classmethod
    def at(cls, difficulty: float) -> "Severity":
        d = float(np.clip(difficulty, 0.0, 1.0))
        return cls(
            lesion_contrast=0.26 - 0.132 * d,
            lesion_size=0.12 - 0.03 * d,
            lesion_count=1.6 - 0.66 * d,
            noise=0.010 + 0.018 * d,
            distractor=0.015 + 0.030 * d,
            exposure=0.5 + 0.6 * d,
        )
