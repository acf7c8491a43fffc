"""Smooth shapes, random fields and independent random streams the film renderer draws with."""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def spawn_streams(rng: np.random.Generator) -> tuple[np.random.Generator, ...]:
    seeds = rng.integers(0, 2**63, size=4)
    return tuple(np.random.default_rng(int(v)) for v in seeds)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return (0.5 + 0.5 * np.tanh(0.5 * z)).astype(np.float32)


def blob(x: np.ndarray, y: np.ndarray, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    f32 = np.float32
    return np.exp(-(((x - f32(cx)) / f32(sx)) ** 2 + ((y - f32(cy)) / f32(sy)) ** 2) / f32(2.0)).astype(f32)


def bands(phase: np.ndarray, sharpness: int) -> np.ndarray:
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


def smooth_field(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """A smooth, unit-variance random field with correlation length ~ ``scale`` (normalised units)."""
    m = _interp_matrix(size, scale)
    coarse = rng.standard_normal((m.shape[1], m.shape[1]), dtype=np.float32)
    return (m @ coarse @ m.T).astype(np.float32)


def burnt_in_marker(rng: np.random.Generator, size: int) -> np.ndarray:
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
