"""The hospitals a synthetic film comes from: the internal site and hospital_b, each a patient mix and a scanner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from cxr.data.sources.base import SourceError
from cxr.data.sources.synthetic.shapes import sigmoid

if TYPE_CHECKING:
    from cxr.config import Config

AP_FRACTION = 0.2  # share of portable (AP) films at the internal site


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
    rows = sigmoid(np.minimum(i - top, s - bottom - i))[:, None]
    cols = sigmoid(np.minimum(i - left, s - right - i))[None, :]
    floor = np.float32(rng.uniform(0.0, 0.03))  # a little scatter under the shutter
    return img * rows * cols + floor * (1 - rows * cols)
