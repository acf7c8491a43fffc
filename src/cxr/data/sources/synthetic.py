"""The embedded default source: deterministic, chest-radiograph-like DICOM files.

``build(cfg, raw_dir)`` writes ``raw_dir/images/<patient_key>_<k>.dcm`` and returns the manifest, so
the whole pipeline runs anywhere without a download. The data is synthetic and says so: it exercises
the code (DICOM decoding, patient-level splits, training, evaluation), it says nothing clinical.

The image model (``render``) works in "density" units, bright = dense as on a MONOCHROME2 film:
a body silhouette on dark air, two lung fields cut by the diaphragm domes, mediastinum, spine and a
heart to the patient's left (image right), posterior and anterior ribs, clavicles, vessel markings,
and for some patients breast and nipple shadows or a gastric bubble. Pose (shift, rotation, scale),
exposure (gradient, gamma) and noise vary per image; the anatomy is fixed per patient.

Pneumonia = patchy consolidations (smooth blobs of added density with a blotchy texture) whose weight
is exactly zero outside the lung mask. ``difficulty`` (0 obvious .. 1 barely visible) lowers their
contrast, size and count and raises the noise, anatomic variation and the lesion-like "distractor"
blotches every lung has, normal or not.

Everything is deterministic from ``(seed, patient index, image index)``: each patient and each image
has its own ``numpy.random.Generator`` (``SeedSequence([seed, n, k])``), so files can be generated in
any order or in parallel, and the same config writes byte-identical files (UIDs included: they come
from ``generate_uid`` with a deterministic entropy source).

The DICOM encodings are deliberately mixed so every decoding path of ``cxr.imaging.read_image`` is
used: DX / CR, 12-bit data in 16-bit words (some with RescaleSlope/Intercept), some 8-bit files,
WindowCenter/Width on some, MONOCHROME1 on ``monochrome1_fraction`` (stored inverted, so it decodes
to the same picture as its MONOCHROME2 twin) and JPEG 2000 lossless on ``jpeg2000_fraction``. These
fractions are exact per block of 10 images (stratified), so even a tiny build contains every kind.

Sites. ``build`` writes the ``internal`` site, the hospital a model is trained at. ``write_site`` writes
another site's labelled films as an external test set (``cxr synthesize-site``). ``hospital_b`` differs
the way a second hospital does, each difference a reason a model trained on ``internal`` scores lower:
- other patients: ids HSB..., and a seed namespace (a word ahead of every patient index), so no body,
  diagnosis or file is shared with the internal set; older (mean age 63 against 55), more portable AP films
  (45 % against 20 %: magnified heart, higher domes, scapulae over the lungs: rarer in training);
- another case mix: prevalence 0.25 against 0.4 and at most 2 films a patient (AUROC does not depend on
  prevalence, but accuracy, PPV and the validation-chosen threshold do);
- another scanner (``Scanner``, applied to the rendered film before encoding): a tighter field of view
  (x1.1: anatomy and lesions larger than in training), electronic collimation (black borders of
  ~6 % a side, which move the percentile window), detector unsharpness (blur) and more noise, both of which
  eat the faint consolidations' texture, and a gamma of 1.6 (a response curve the per-image percentile
  window cannot undo: lungs darker, low-contrast lesions compressed);
- another resolution (320 px against 256) and more MONOCHROME1 files (70 % against 30 %); these only change
  the decoding path, which should not matter: a check that it does not.
The internal profile changes nothing: its files are byte-identical to those written before sites existed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from scipy import ndimage

from cxr.data.sources.base import SourceData, SourceError
from cxr.fsutil import atomic_dir
from cxr.imaging import patient_key

if TYPE_CHECKING:
    from cxr.config import Config

SOURCE = "synthetic"
CLASSES = ["normal", "pneumonia"]
IMAGES_DIR = "images"
# Stratification block for the encoding mix: every 10 consecutive images hold the exact fractions.
BLOCK = 10
EIGHT_BIT_FRACTION = 0.2
RESCALE_FRACTION = 0.5  # of the 12-bit files
WINDOW_FRACTION = 0.4
CR_FRACTION = 0.3
AP_FRACTION = 0.2
# (slope, intercept) pairs written on the rescaled 12-bit files
RESCALES = ((1.0, -1024.0), (0.5, 0.0), (2.0, -2048.0), (1.0, 100.0))
PARALLEL_MIN_IMAGES = 1500
_UID_ROOT = "cxr-synthetic-v1"
_DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
_CR = "1.2.840.10008.5.1.4.1.1.1"
_EPOCH = _dt.date(2015, 1, 1)

View = Literal["PA", "AP"]
Sex = Literal["M", "F"]


# --- image model ----------------------------------------------------------------------------------


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


@dataclass
class Rendering:
    """One rendered image and the layers behind it (for tests and figures)."""

    image: np.ndarray  # float32 in [0, 1], display orientation
    lung_mask: np.ndarray  # bool: where a consolidation may appear
    lesion: np.ndarray  # float32 added density (0 everywhere for a normal image)
    lesion_free: np.ndarray | None = None  # the same image without the lesions (same noise)
    meta: dict[str, Any] = field(default_factory=dict)


def render(
    rng: np.random.Generator,
    label: int | str,
    difficulty: float,
    size: int = 256,
    *,
    view: View = "PA",
    sex: Sex | None = None,
    anatomy: Anatomy | None = None,
) -> np.ndarray:
    """One synthetic chest radiograph, float32 (size, size) in [0, 1], bright = dense.

    ``label``: 1 / "pneumonia" draws consolidations inside the lungs, 0 / "normal" none.
    ``anatomy`` defaults to a random one from ``rng`` (``sample_anatomy``) so the call is self-contained.
    """
    return render_layers(rng, label, difficulty, size, view=view, sex=sex, anatomy=anatomy).image


def render_layers(
    rng: np.random.Generator,
    label: int | str,
    difficulty: float,
    size: int = 256,
    *,
    view: View = "PA",
    sex: Sex | None = None,
    anatomy: Anatomy | None = None,
    lesion_free: bool = False,
) -> Rendering:
    """``render`` plus its lung mask, lesion layer and (``lesion_free=True``) lesion-free twin."""
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    positive = label in (1, True, "pneumonia") or (isinstance(label, str) and label.lower() == "pneumonia")
    # Independent sub-streams: the lesion draws never shift the anatomy, pose or noise draws.
    r_pose, r_anat, r_lesion, r_noise = _spawn(rng)
    sev = Severity.at(difficulty)
    if sex is None:
        sex = "F" if r_anat.random() < 0.5 else "M"
    if anatomy is None:
        anatomy = sample_anatomy(r_anat, sex, difficulty)
    if view == "AP":  # supine/portable: magnified heart, poorer inspiration, scapulae over the lungs
        anatomy = replace(
            anatomy,
            heart_ab=(anatomy.heart_ab[0] * 1.15, anatomy.heart_ab[1] * 1.08),
            lung_b=anatomy.lung_b * 0.93,
            dome_y=(anatomy.dome_y[0] - 0.05, anatomy.dome_y[1] - 0.05),
            clavicle_y=anatomy.clavicle_y - 0.06,
        )
    f32 = np.float32
    s = size
    edge = f32(max(1.2 * 2.0 / s, 0.006))  # soft edges of ~1 pixel, in normalised units

    # Pose: the patient is placed slightly differently on every image.
    theta = np.deg2rad(np.clip(r_pose.normal(0.0, 2.5), -6.0, 6.0))
    scale = r_pose.uniform(0.93, 1.06)
    tx, ty = r_pose.uniform(-0.05, 0.05, size=2)
    g = ((np.arange(s, dtype=f32) + f32(0.5)) * f32(2.0 / s) - f32(1.0)).astype(f32)
    uu, vv = g[None, :], g[:, None]
    c, sn = f32(np.cos(theta) / scale), f32(np.sin(theta) / scale)
    x = (c * (uu - f32(tx)) + sn * (vv - f32(ty))).astype(f32)
    y = (-sn * (uu - f32(tx)) + c * (vv - f32(ty))).astype(f32)
    a = anatomy

    # Body: a soft-edged thorax that narrows to the neck above the shoulders; density ~ path length.
    w = f32(a.neck_w) + f32(a.body_w - a.neck_w) * _sig((y - f32(a.shoulder_y)) / f32(0.05))
    t = np.clip(1.0 - (x / w) ** 2, 0.0, 1.0)
    dens = f32(a.body_density) * np.sqrt(t) * _sig((w - np.abs(x)) / edge)

    # Lungs: ellipses cut by the diaphragm domes, the mediastinum and the heart.
    hx, hy = a.heart_c
    ha, hb = a.heart_ab
    rh2 = ((x - f32(hx)) / f32(ha)) ** 2 + ((y - f32(hy)) / f32(hb)) ** 2
    heart = _sig((f32(1.0) - np.sqrt(rh2)) * f32(min(ha, hb)) / edge)
    med_w = f32(a.mediastinum_w) + f32(0.03) * (y + f32(1.0))
    outside_med = _sig((np.abs(x - f32(0.01)) - med_w) / edge)
    lung_soft = np.zeros_like(x)
    lung_thick = np.zeros_like(x)
    domes = []
    for cx, la, dy in zip(a.lung_cx, a.lung_a, a.dome_y):
        r2 = ((x - f32(cx)) / f32(la)) ** 2 + ((y - f32(a.lung_cy)) / f32(a.lung_b)) ** 2
        inside = _sig((f32(1.0) - np.sqrt(r2)) * f32(min(la, a.lung_b)) / edge)
        dome = f32(dy) - f32(a.dome_h) * np.clip(1.0 - ((x - f32(cx)) / f32(1.15 * la)) ** 2, 0.0, 1.0)
        domes.append(dome)
        lung_soft += inside * _sig((dome - y) / edge)
        lung_thick += np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
    lung_soft *= outside_med * (f32(1.0) - heart)
    lung_mask = lung_soft > 0.5
    dens -= f32(a.lung_depth) * lung_soft * (f32(0.35) + f32(0.65) * lung_thick)
    dens += f32(a.heart_density) * heart * np.sqrt(np.clip(1.0 - rh2, 0.0, 1.0))
    # Aortic knob, spine (with vertebral bodies), gastric bubble under the left hemidiaphragm.
    dens += f32(0.05) * _blob(x, y, 0.10, a.heart_c[1] - 0.52, 0.07, 0.06)
    spine = _sig((f32(0.055) - np.abs(x - f32(0.01))) / edge)
    vert = f32(0.85) + f32(0.15) * np.cos(f32(2 * np.pi) * (y - f32(a.rib_top)) / f32(a.rib_spacing))
    dens += f32(0.10) * spine * vert * _sig((y + f32(0.85)) / f32(0.05))
    if a.gastric_bubble > 0:
        bubble = _blob(x, y, a.lung_cx[1] + 0.05, a.dome_y[1] + 0.09, 0.09, 0.05)
        dens -= f32(a.gastric_bubble) * bubble

    # Ribs: one periodic phase per rib family; posterior arches rise near the spine, anterior ribs
    # run down towards the sternum. Visible within the chest wall, above the domes.
    xa = np.abs(x - f32(0.01))
    dome_lo = np.where(x < 0, domes[0], domes[1])
    chest = (
        _sig((f32(0.94) * w - xa) / edge)
        * _sig((xa - f32(0.05)) / edge)
        * _sig((dome_lo + f32(0.06) - y) / f32(0.03))
        * _sig((y - f32(a.rib_top) + f32(0.05)) / f32(0.03))
    )
    post = (y - f32(a.rib_top) - f32(0.9) * (xa - f32(0.15)) ** 2) / f32(a.rib_spacing)
    ant = (y - f32(a.rib_top) - f32(0.12) + f32(0.32) * xa) / f32(a.rib_spacing * 1.15)
    ribs = f32(a.rib_density) * _bands(post, 8) + f32(0.35 * a.rib_density) * _bands(ant, 6)
    dens += ribs * chest
    # Clavicles: slightly curved bands from the sternum out to the shoulders.
    cl = y - (f32(a.clavicle_y) - f32(0.2) * (xa - f32(0.07)) + f32(0.25) * (xa - f32(0.35)) ** 2)
    clav = np.exp(-((cl / f32(0.024)) ** 2)) * _sig((xa - f32(0.06)) / edge)
    clav = clav * _sig((f32(0.62) - xa) / f32(0.02))
    dens += f32(0.08) * clav.astype(f32)
    if view == "AP":
        for sx in (-1, 1):
            dens += f32(0.035) * _blob(x, y, sx * 0.68, -0.35, 0.12, 0.24)

    # Normal variation inside the lungs: vessel markings fanning out from the hila, breast and nipple
    # shadows, and lesion-like blotches of every size (the distractors that keep this from being easy).
    field_v = _smooth_field(r_anat, s, 0.07)
    hilum = np.zeros_like(x)
    for sx in (-1, 1):
        hilum += np.exp(-np.sqrt((x - f32(sx * 0.16)) ** 2 + (y - f32(a.lung_cy + 0.05)) ** 2) / f32(0.3))
    vessels = np.exp(-((field_v / f32(0.22)) ** 2)) * hilum
    dens += f32(a.vessel_density) * vessels * lung_soft
    dens += f32(0.05) * _blob(x, y, -0.16, a.lung_cy + 0.05, 0.06, 0.08) + f32(0.05) * _blob(
        x, y, 0.16, a.lung_cy + 0.05, 0.06, 0.08
    )
    if a.breast > 0:
        for sx in (-1, 1):
            bx, by = sx * a.breast_c[0], a.breast_c[1]
            rb2 = ((x - f32(bx)) / f32(0.30)) ** 2 + ((y - f32(by)) / f32(0.20)) ** 2
            dens += f32(a.breast) * np.sqrt(np.clip(1.0 - rb2, 0.0, 1.0)) * _sig((f32(1.0) - rb2) / f32(0.05))
    if a.nipples:
        for sx in (-1, 1):
            dens += f32(0.05) * _blob(x, y, sx * a.breast_c[0], a.breast_c[1] - 0.12, 0.022, 0.022)
    blot = _smooth_field(r_anat, s, 0.09) + f32(0.6) * _smooth_field(r_anat, s, 0.045)
    dens += f32(sev.distractor) * np.clip(blot - f32(0.3), 0.0, None) * lung_soft

    # Pneumonia: patchy consolidations, weighted to zero outside the lung mask.
    lesion = np.zeros_like(x)
    n_lesions = 0
    inner = np.clip((lung_soft - f32(0.5)) * f32(2.0), 0.0, 1.0)  # exactly 0 outside lung_mask
    if positive and lung_mask.any():
        n_lesions = 1 + int(r_lesion.poisson(sev.lesion_count))
        idx = np.flatnonzero(lung_mask)
        rows = idx // s
        weight = (rows / s + 0.3).astype(np.float64)  # lower zones more often
        texture = _smooth_field(r_lesion, s, 0.035)
        patchy = np.clip(f32(0.55) + f32(0.9) * texture, 0.0, 1.0)
        for _ in range(n_lesions):
            k = idx[r_lesion.choice(idx.size, p=weight / weight.sum())]
            cu, cv = g[k % s], g[k // s]
            sx_, sy_ = sev.lesion_size * r_lesion.uniform(0.6, 1.5, size=2)
            contrast = sev.lesion_contrast * r_lesion.uniform(0.6, 1.4)
            env = np.exp(-(((uu - cu) / f32(sx_)) ** 2 + ((vv - cv) / f32(sy_)) ** 2) / f32(2.0))
            lesion += f32(contrast) * env
        lesion = (lesion * patchy * inner).astype(f32)

    # Exposure: heel-effect gradient, per-image gain/offset and gamma; quantum + electronic noise.
    gx, gy = r_noise.uniform(-0.08, 0.08, size=2) * sev.exposure
    gain = f32(r_noise.uniform(0.85, 1.1)) * (f32(1.0) + f32(gx) * uu + f32(gy) * vv)
    offset = f32(r_noise.uniform(0.02, 0.07))
    gamma = f32(np.exp(r_noise.normal(0.0, 0.12 * sev.exposure)))
    z = r_noise.standard_normal((s, s), dtype=f32)
    sigma = f32(sev.noise * s / 256.0)  # per-pixel noise that averages to the same SNR at 64 px
    marker = _marker(r_noise, s)

    def expose(d: np.ndarray) -> np.ndarray:
        img = np.clip(offset + gain * d, 0.0, 1.0) ** gamma
        img = img + sigma * (f32(0.6) + f32(0.8) * img) * z
        img = np.maximum(img, marker)
        return np.clip(img, 0.0, 1.0).astype(f32)

    out = Rendering(
        image=expose(dens + lesion),
        lung_mask=lung_mask,
        lesion=lesion,
        meta={
            "n_lesions": n_lesions,
            "view": view,
            "sex": sex,
            "pose": (float(tx), float(ty), float(theta), float(scale)),
        },
    )
    if lesion_free:
        out.lesion_free = expose(dens)
    return out


def _spawn(rng: np.random.Generator) -> tuple[np.random.Generator, ...]:
    seeds = rng.integers(0, 2**63, size=4)
    return tuple(np.random.default_rng(int(v)) for v in seeds)


def _sig(z: np.ndarray) -> np.ndarray:
    return (0.5 + 0.5 * np.tanh(0.5 * z)).astype(np.float32)


def _blob(x: np.ndarray, y: np.ndarray, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    f32 = np.float32
    return np.exp(-(((x - f32(cx)) / f32(sx)) ** 2 + ((y - f32(cy)) / f32(sy)) ** 2) / f32(2.0)).astype(f32)


def _bands(phase: np.ndarray, sharpness: int) -> np.ndarray:
    """Periodic bumps (one per unit of phase), narrower for a larger ``sharpness``."""
    wave = np.float32(0.5) + np.float32(0.5) * np.cos(np.float32(2 * np.pi) * phase)
    return (wave**sharpness).astype(np.float32)


@lru_cache(maxsize=32)
def _interp_matrix(size: int, scale: float) -> np.ndarray:
    """(size, n) Gaussian interpolation from a coarse lattice (spacing ~ scale) to the pixel grid."""
    n = int(np.ceil(2.0 / scale)) + 5
    knots = np.linspace(-1.0 - 2.5 * scale, 1.0 + 2.5 * scale, n)
    px = (np.arange(size) + 0.5) * (2.0 / size) - 1.0
    m = np.exp(-0.5 * ((px[:, None] - knots[None, :]) / scale) ** 2)
    m /= np.sqrt((m**2).sum(axis=1, keepdims=True))  # unit variance for unit white noise
    return m.astype(np.float32)


def _smooth_field(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """A smooth, unit-variance random field with correlation length ~ ``scale`` (normalised units)."""
    m = _interp_matrix(size, scale)
    coarse = rng.standard_normal((m.shape[1], m.shape[1]), dtype=np.float32)
    return (m @ coarse @ m.T).astype(np.float32)


def _marker(rng: np.random.Generator, size: int) -> np.ndarray:
    """A burnt-in lead side marker (a bright square) in an upper corner on most films."""
    out = np.zeros((size, size), dtype=np.float32)
    if rng.random() < 0.7:
        side = max(2, size // 20)
        top = int(rng.integers(size // 40 + 1, size // 8 + 2))
        left = int(rng.integers(size // 40 + 1, size // 8 + 2))
        if rng.random() < 0.5:
            left = size - left - side
        out[top : top + side, left : left + side] = np.float32(rng.uniform(0.85, 1.0))
    return out


# --- DICOM encoding -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoding:
    """How one image is stored; ``build`` mixes these so every decoding path is used."""

    bits: Literal[8, 12] = 12
    monochrome1: bool = False
    jpeg2000: bool = False
    rescale: tuple[float, float] | None = None  # (slope, intercept)
    window: bool = False
    modality: Literal["DX", "CR"] = "DX"


def stored_values(image: np.ndarray, enc: Encoding, rng: np.random.Generator) -> np.ndarray:
    """Display image in [0, 1] -> the integers a detector would store (inverted for MONOCHROME1)."""
    top = 255 if enc.bits == 8 else 4095
    span = rng.uniform(0.80, 0.97) * top  # detectors rarely use their whole range
    low = rng.uniform(0.0, top - span)
    vals = np.rint(low + np.asarray(image, dtype=np.float64) * span)
    vals = np.clip(vals, 0, top)
    if enc.monochrome1:
        vals = top - vals
    return vals.astype(np.uint8 if enc.bits == 8 else np.uint16)


def make_dataset(
    image: np.ndarray,
    enc: Encoding,
    rng: np.random.Generator,
    *,
    patient_id: str = "SYN00000",
    patient_name: str = "SYNTHETIC^PATIENT",
    sex: Sex = "M",
    age: int = 50,
    view: View = "PA",
    study_date: _dt.date = _EPOCH,
    uid_entropy: tuple[Any, ...] = (),
) -> Any:
    """A complete single-frame DICOM dataset for a display image in [0, 1].

    ``rng`` draws the detector gain/offset and window; ``uid_entropy`` makes the UIDs reproducible.
    A MONOCHROME1 dataset stores inverted values (and a mirrored window) so that a reader applying
    modality LUT, VOI window and the MONOCHROME1 inversion shows the same picture as the
    MONOCHROME2 dataset made from the same image and the same ``rng`` state.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    arr = stored_values(image, replace(enc, monochrome1=False), rng)
    top = 255 if enc.bits == 8 else 4095
    rows, cols = arr.shape
    entropy = [str(e) for e in (_UID_ROOT, *uid_entropy)]

    def uid(kind: str) -> str:
        return generate_uid(entropy_srcs=[*entropy, kind])

    sop_class = _DX_FOR_PRESENTATION if enc.modality == "DX" else _CR
    sop_uid = uid("sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    date = study_date.strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    hour, minute = 9 + int(rng.integers(0, 9)), int(rng.integers(0, 60))
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = f"{hour:02d}{minute:02d}00"
    ds.AccessionNumber = ""
    ds.Modality = enc.modality
    ds.Manufacturer = "cxr synthetic generator"
    ds.InstitutionName = "SYNTHETIC DATA - NOT A PATIENT"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"CHEST {view} (SYNTHETIC)"
    ds.SeriesDescription = f"CHEST {view}"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = sex
    ds.PatientAge = f"{int(age):03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.PatientOrientation = ["L", "F"]  # rows run to the patient's left, columns to the feet
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    if enc.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BurnedInAnnotation = "NO"
    ds.ImagerPixelSpacing = [f"{360.0 / rows:.4f}", f"{360.0 / cols:.4f}"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if enc.monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 8 if enc.bits == 8 else 16
    ds.BitsStored = enc.bits
    ds.HighBit = enc.bits - 1
    ds.PixelRepresentation = 0
    slope, intercept = enc.rescale if enc.rescale is not None else (1.0, 0.0)
    if enc.rescale is not None:
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleType = "US"
    if enc.window:
        # A window covering the image with a little margin, in modality (rescaled) units.
        lo_m, hi_m = float(arr.min()) * slope + intercept, float(arr.max()) * slope + intercept
        width = max(2.0, float(np.ceil((hi_m - lo_m) * rng.uniform(1.02, 1.25))))
        center = float(np.round((lo_m + hi_m) / 2))
        if enc.monochrome1:  # mirror the window into the inverted value space (PS3.3 C.11.2.1.2)
            center = (top * slope + 2 * intercept) - center + 1
        ds.WindowCenter = f"{center:g}"
        ds.WindowWidth = f"{width:g}"
        ds.VOILUTFunction = "LINEAR"
    if enc.monochrome1:
        arr = (top - arr).astype(arr.dtype)
    ds.LossyImageCompression = "00"
    ds.PixelData = arr.tobytes()
    if enc.jpeg2000:
        ds.compress(JPEG2000Lossless, arr, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    return ds


def encode(ds: Any) -> bytes:
    """The dataset as DICOM Part 10 file bytes."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --- sites ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scanner:
    """What a site's X-ray system does to a rendered film (``scan``); the default changes nothing."""

    zoom: float = 1.0  # tighter field of view: > 1 magnifies the patient about the centre
    blur: float = 0.0  # detector unsharpness: Gaussian sigma, in pixels of a 256-px film
    gamma: float = 1.0  # response curve, display ** gamma: a percentile window cannot undo it
    noise: float = 0.0  # extra noise, in display units of a 256-px film (the same at any size once resized)
    collimation: float = 0.0  # mean share of each side outside the collimator, shown black


@dataclass(frozen=True)
class SiteProfile:
    """A hospital: who its patients are and how its films look. ``None`` = the config's value."""

    name: str
    patient_prefix: str = "SYN"  # fictitious patient ids: <prefix><index>
    namespace: int = 0  # a seed word ahead of every patient index (0: none); larger than any index
    age_mean: float = 55.0
    ap_fraction: float = AP_FRACTION  # portable (AP) films
    n_patients: int | None = None
    images_per_patient_max: int | None = None
    prevalence: float | None = None
    size: int | None = None
    monochrome1_fraction: float | None = None
    scanner: Scanner = Scanner()

    @property
    def seed_words(self) -> tuple[int, ...]:
        return (self.namespace,) if self.namespace else ()

    def patient_id(self, n: int) -> str:
        return f"{self.patient_prefix}{n:05d}"

    def settings(self) -> dict[str, Any]:
        """The ``data.synthetic`` values this site fixes."""
        keys = ("n_patients", "images_per_patient_max", "prevalence", "size", "monochrome1_fraction")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


INTERNAL = SiteProfile("internal")
HOSPITAL_B = SiteProfile(
    "hospital_b",
    patient_prefix="HSB",
    namespace=0x4853_4221,
    age_mean=63.0,
    ap_fraction=0.45,
    n_patients=300,
    images_per_patient_max=2,
    prevalence=0.25,
    size=320,
    monochrome1_fraction=0.7,
    scanner=Scanner(zoom=1.1, blur=1.5, gamma=1.6, noise=0.025, collimation=0.06),
)
SITES = {site.name: site for site in (INTERNAL, HOSPITAL_B)}


def site_profile(name: str) -> SiteProfile:
    if name not in SITES:
        raise SourceError(f"unknown site {name!r}; known sites: {', '.join(SITES)}")
    return SITES[name]


def site_config(cfg: "Config", site: SiteProfile, n_patients: int | None = None, seed: int | None = None) -> "Config":
    """``cfg`` with the site's ``data.synthetic`` settings, then the caller's patient count and seed."""
    values = site.settings()
    if n_patients is not None:
        values["n_patients"] = n_patients
    if seed is not None:
        values["seed"] = seed
    return cfg.override({f"data.synthetic.{k}": v for k, v in values.items()})


def scan(image: np.ndarray, scanner: Scanner, rng: np.random.Generator) -> np.ndarray:
    """A display image as ``scanner`` records it: field of view, unsharpness, response, noise, collimation."""
    s = image.shape[0]
    px = s / 256.0  # the scanner's figures are given for a 256-px film
    img = np.asarray(image, dtype=np.float32)
    if scanner.zoom != 1.0:
        centre = (s - 1) / 2.0
        img = ndimage.affine_transform(
            img, np.eye(2) / scanner.zoom, offset=centre * (1 - 1 / scanner.zoom), order=1, mode="nearest"
        )
    if scanner.blur > 0:
        img = ndimage.gaussian_filter(img, scanner.blur * px)
    img = np.clip(img, 0.0, 1.0) ** np.float32(scanner.gamma)
    if scanner.noise > 0:
        img = img + np.float32(scanner.noise * px) * rng.standard_normal(img.shape, dtype=np.float32)
    if scanner.collimation > 0:
        img = _collimate(img, scanner.collimation, rng)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _collimate(img: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """Black outside a slightly asymmetric collimator rectangle (an electronic shutter), soft-edged."""
    s = img.shape[0]
    top, bottom, left, right = share * s * rng.uniform(0.6, 1.4, size=4)
    i = np.arange(s, dtype=np.float32) + np.float32(0.5)
    rows = _sig(np.minimum(i - top, s - bottom - i))[:, None]
    cols = _sig(np.minimum(i - left, s - right - i))[None, :]
    floor = np.float32(rng.uniform(0.0, 0.03))  # a little scatter under the shutter
    return img * rows * cols + floor * (1 - rows * cols)


# --- the source -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePlan:
    index: int  # global image number (the encoding mix is stratified over it)
    patient: int
    k: int  # image number within the patient (follow-up)
    label: int
    sex: Sex
    age: int
    view: View
    study_date: _dt.date
    encoding: Encoding
    file: str  # relative to raw_dir


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) % (1 << 64), *map(int, keys)]))


def _stratified(seed: int, salt: int, index: int, fraction: float, words: tuple[int, ...] = ()) -> bool:
    """Flags ``fraction`` of every block of BLOCK consecutive images (stratified), at random positions."""
    block, pos = divmod(index, BLOCK)
    r = _rng(seed, *words, 7_000_000 + salt, block)
    offset = _rng(seed, *words, 7_000_000 + salt, 10**9).random()

    def cum(b: int) -> int:
        return int(np.floor(b * BLOCK * fraction + offset))

    count = cum(block + 1) - cum(block)
    return pos in r.permutation(BLOCK)[:count]


def plan(cfg: "Config", site: SiteProfile = INTERNAL) -> list[ImagePlan]:
    """Every image's patient, label, demographics and encoding (cheap; no pixels).

    ``cfg`` carries the site's settings already (``site_config``); ``site`` adds who its patients are.
    """
    sc = cfg.data.synthetic
    w = site.seed_words
    out: list[ImagePlan] = []
    for n in range(sc.n_patients):
        r = _rng(sc.seed, *w, n)
        label = int(r.random() < sc.prevalence)
        sex: Sex = "F" if r.random() < 0.5 else "M"
        age = int(np.clip(np.rint(r.normal(site.age_mean, 17)), 18, 95))
        n_images = int(r.integers(1, sc.images_per_patient_max + 1))
        first = _EPOCH + _dt.timedelta(days=int(r.integers(0, 9 * 365)))
        key = patient_key(site.patient_id(n), SOURCE)
        day = first
        for k in range(n_images):
            i = len(out)
            ri = _rng(sc.seed, *w, n, k, 1)
            view: View = "AP" if ri.random() < site.ap_fraction else "PA"
            bits = 8 if _stratified(sc.seed, 1, i, EIGHT_BIT_FRACTION, w) else 12
            rescale = None
            if bits == 12 and _stratified(sc.seed, 2, i, RESCALE_FRACTION, w):
                rescale = RESCALES[int(ri.integers(len(RESCALES)))]
            enc = Encoding(
                bits=bits,
                monochrome1=_stratified(sc.seed, 3, i, sc.monochrome1_fraction, w),
                jpeg2000=_stratified(sc.seed, 4, i, sc.jpeg2000_fraction, w),
                rescale=rescale,
                window=_stratified(sc.seed, 5, i, WINDOW_FRACTION, w),
                modality="CR" if ri.random() < CR_FRACTION else "DX",
            )
            if k:
                day = day + _dt.timedelta(days=int(ri.integers(1, 40)))
            out.append(
                ImagePlan(
                    index=i,
                    patient=n,
                    k=k,
                    label=label,
                    sex=sex,
                    age=age + (day - first).days // 365,
                    view=view,
                    study_date=day,
                    encoding=enc,
                    file=f"{IMAGES_DIR}/{key}_{k}.dcm",
                )
            )
    return out


def patient_anatomy(seed: int, patient: int, sex: Sex, difficulty: float, site: SiteProfile = INTERNAL) -> Anatomy:
    return sample_anatomy(_rng(seed, *site.seed_words, patient, 10**6), sex, difficulty)


def generate(p: ImagePlan, seed: int, difficulty: float, size: int, site: SiteProfile = INTERNAL) -> bytes:
    """One planned image as DICOM file bytes (a pure function of its arguments)."""
    w = site.seed_words
    anatomy = patient_anatomy(seed, p.patient, p.sex, difficulty, site)
    rng = _rng(seed, *w, p.patient, p.k, 2)
    image = render(rng, p.label, difficulty, size, view=p.view, sex=p.sex, anatomy=anatomy)
    if site.scanner != Scanner():  # the internal scanner leaves the image (and its bytes) untouched
        image = scan(image, site.scanner, _rng(seed, *w, p.patient, p.k, 4))
    ds = make_dataset(
        image,
        p.encoding,
        _rng(seed, *w, p.patient, p.k, 3),
        patient_id=site.patient_id(p.patient),
        patient_name=f"SYNTHETIC^PATIENT{p.patient:05d}",
        sex=p.sex,
        age=p.age,
        view=p.view,
        study_date=p.study_date,
        uid_entropy=(seed, p.patient, p.k),
    )
    return encode(ds)


def _blas_threads(n: int) -> Any:
    """Small matrix products are slower multi-threaded (thread wake-ups dominate); keep BLAS at n."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(n, user_api="blas")


def _one_blas_thread() -> None:
    global _WORKER_LIMIT
    _WORKER_LIMIT = _blas_threads(1)


_WORKER_LIMIT: Any = None


def _write(args: tuple[ImagePlan, int, float, int, str, SiteProfile]) -> str:
    p, seed, difficulty, size, raw_dir, site = args
    path = Path(raw_dir) / p.file
    data = generate(p, seed, difficulty, size, site)
    if not (path.is_file() and path.read_bytes() == data):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return p.file


def _write_all(cfg: "Config", plans: list[ImagePlan], out_dir: Path, site: SiteProfile, workers: int | None) -> None:
    """Generate every planned file under ``out_dir``, in ``workers`` processes for large sets."""
    sc = cfg.data.synthetic
    if workers is None:
        workers = cfg.prepare.workers if len(plans) >= PARALLEL_MIN_IMAGES else 1
    jobs = [(p, sc.seed, sc.difficulty, sc.size, str(out_dir), site) for p in plans]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers, initializer=_one_blas_thread) as pool:
            list(pool.map(_write, jobs, chunksize=64))
    else:
        with _blas_threads(1):
            for job in jobs:
                _write(job)


def build(cfg: "Config", raw_dir: Path, workers: int | None = None) -> SourceData:
    """Write the synthetic DICOM files under ``raw_dir/images`` and return their manifest.

    Stale ``.dcm`` files in that folder (from a larger earlier build) are removed so the raw folder
    holds exactly what the manifest lists. ``workers`` defaults to ``prepare.workers`` for large
    builds (>= PARALLEL_MIN_IMAGES images) and 1 otherwise; the files do not depend on it.
    """
    sc = cfg.data.synthetic
    raw_dir = Path(raw_dir)
    images_dir = raw_dir / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    plans = plan(cfg)
    _write_all(cfg, plans, raw_dir, INTERNAL, workers)
    wanted = {Path(p.file).name for p in plans}
    for stale in images_dir.glob("*.dcm"):
        if stale.name not in wanted:
            stale.unlink()

    manifest = pd.DataFrame(
        {
            "image": [p.file for p in plans],
            "label": [CLASSES[p.label] for p in plans],
            "patient_key": [patient_key(f"SYN{p.patient:05d}", SOURCE) for p in plans],
            "view": [p.view for p in plans],
            "age": [p.age for p in plans],
            "sex": [p.sex for p in plans],
            "follow_up": [p.k for p in plans],
            "source": SOURCE,
            "split": None,
        }
    )
    n_pos = int(manifest["label"].eq("pneumonia").sum())
    notes = [
        f"SYNTHETIC data: {len(plans)} generated chest-radiograph-like DICOM images of "
        f"{sc.n_patients} fictitious patients ({n_pos} pneumonia images); for exercising the pipeline only, "
        "results on it say nothing about clinical performance.",
        f"synthetic generator: seed={sc.seed}, size={sc.size}, difficulty={sc.difficulty}, "
        f"prevalence={sc.prevalence}, jpeg2000_fraction={sc.jpeg2000_fraction}, "
        f"monochrome1_fraction={sc.monochrome1_fraction}",
    ]
    return SourceData(manifest=manifest, task="binary", classes=list(CLASSES), files_in_raw=True, notes=notes)


# --- a site's external test set -------------------------------------------------------------------

SITE_MANIFEST = "manifest.csv"
SITE_INFO = "site.json"


def write_site(
    cfg: "Config",
    site: str,
    out: Path,
    *,
    n_patients: int | None = None,
    seed: int | None = None,
    workers: int | None = None,
) -> pd.DataFrame:
    """Write ``site``'s labelled films as ``out/<label>/<patient_key>_<k>.dcm`` and return their manifest.

    ``cxr evaluate-external --data`` reads the folder (labels from the sub-folder names) or
    ``out/manifest.csv`` (the manifest source's columns, adding patient keys, view, age and sex).
    ``out`` appears whole or not at all; an existing folder is replaced only if this function wrote it.
    """
    profile = site_profile(site)
    cfg = site_config(cfg, profile, n_patients=n_patients, seed=seed)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / SITE_INFO).is_file():
        raise SourceError(f"{out} exists and was not written by synthesize-site; give a new or empty folder")
    plans = [replace(p, file=f"{CLASSES[p.label]}/{Path(p.file).name}") for p in plan(cfg, profile)]
    manifest = pd.DataFrame(
        {
            "path": [p.file for p in plans],
            "label": [CLASSES[p.label] for p in plans],
            "patient_id": [patient_key(profile.patient_id(p.patient), SOURCE) for p in plans],
            "view": [p.view for p in plans],
            "age": [p.age for p in plans],
            "sex": [p.sex for p in plans],
        }
    )
    with atomic_dir(out) as tmp:
        for label in CLASSES:
            (tmp / label).mkdir()
        _write_all(cfg, plans, tmp, profile, workers)
        manifest.to_csv(tmp / SITE_MANIFEST, index=False)
        (tmp / SITE_INFO).write_text(json.dumps(_site_info(cfg, profile, manifest), indent=2) + "\n")
    return manifest


def _site_info(cfg: "Config", site: SiteProfile, manifest: pd.DataFrame) -> dict[str, Any]:
    sc = cfg.data.synthetic
    return {
        "note": "SYNTHETIC data from cxr's generator: fictitious patients, no clinical meaning",
        "site": asdict(site),
        "data.synthetic": sc.model_dump(mode="json"),
        "n_images": len(manifest),
        "n_patients": int(manifest["patient_id"].nunique()),
        "images_per_label": manifest["label"].value_counts().sort_index().to_dict(),
    }
