"""The film renderer: density layers (body, lungs, ribs, texture, lesions) exposed into one radiograph."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cxr.data.sources.synthetic.anatomy import Anatomy, Severity, Sex, View, sample_anatomy
from cxr.data.sources.synthetic.shapes import bands, blob, burnt_in_marker, sigmoid, smooth_field, spawn_streams


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
    """``render`` plus its lung mask, lesion layer and (``lesion_free=True``) lesion-free twin.

    The film is built in density layers, in a fixed order (the float32 sums and the random draws depend on it):
    body, lungs and mediastinum, ribs and clavicles, normal lung texture, then the lesions and the exposure."""
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    positive = label in (1, True, "pneumonia") or (isinstance(label, str) and label.lower() == "pneumonia")
    # Independent sub-streams: the lesion draws never shift the anatomy, pose or noise draws.
    r_pose, r_anat, r_lesion, r_noise = spawn_streams(rng)
    sev = Severity.at(difficulty)
    if sex is None:
        sex = "F" if r_anat.random() < 0.5 else "M"
    a = _as_viewed(anatomy if anatomy is not None else sample_anatomy(r_anat, sex, difficulty), view)
    f = _posed_frame(r_pose, size)
    dens, w = _body(a, f)
    lungs = _lungs_and_mediastinum(a, f, dens)
    _ribs_and_clavicles(a, f, w, lungs.domes, view, dens)
    _lung_texture(a, sev, r_anat, f, lungs.soft, dens)
    lesion, n_lesions = _lesions(positive, sev, r_lesion, f, lungs)
    expose = _exposure(sev, r_noise, f)
    out = Rendering(
        image=expose(dens + lesion),
        lung_mask=lungs.mask,
        lesion=lesion,
        meta={"n_lesions": n_lesions, "view": view, "sex": sex, "pose": f.pose},
    )
    if lesion_free:
        out.lesion_free = expose(dens)
    return out


def _as_viewed(anatomy: Anatomy, view: View) -> Anatomy:
    """An AP (supine/portable) film: magnified heart, poorer inspiration, scapulae over the lungs."""
    if view != "AP":
        return anatomy
    return replace(
        anatomy,
        heart_ab=(anatomy.heart_ab[0] * 1.15, anatomy.heart_ab[1] * 1.08),
        lung_b=anatomy.lung_b * 0.93,
        dome_y=(anatomy.dome_y[0] - 0.05, anatomy.dome_y[1] - 0.05),
        clavicle_y=anatomy.clavicle_y - 0.06,
    )


@dataclass
class _Frame:
    """The film's pixel grid in normalised units: ``g`` the centres, ``uu``/``vv`` the film's axes, ``x``/``y`` the
    patient's (after the pose), ``edge`` a soft edge of about one pixel."""

    s: int
    g: np.ndarray
    uu: np.ndarray
    vv: np.ndarray
    x: np.ndarray
    y: np.ndarray
    edge: np.float32
    pose: tuple[float, float, float, float]  # tx, ty, theta, scale


def _posed_frame(r_pose: np.random.Generator, s: int) -> _Frame:
    """The patient is placed slightly differently on every image: rotation, scale and shift."""
    f32 = np.float32
    theta = np.deg2rad(np.clip(r_pose.normal(0.0, 2.5), -6.0, 6.0))
    scale = r_pose.uniform(0.93, 1.06)
    tx, ty = r_pose.uniform(-0.05, 0.05, size=2)
    g = ((np.arange(s, dtype=f32) + f32(0.5)) * f32(2.0 / s) - f32(1.0)).astype(f32)
    uu, vv = g[None, :], g[:, None]
    c, sn = f32(np.cos(theta) / scale), f32(np.sin(theta) / scale)
    x = (c * (uu - f32(tx)) + sn * (vv - f32(ty))).astype(f32)
    y = (-sn * (uu - f32(tx)) + c * (vv - f32(ty))).astype(f32)
    edge = f32(max(1.2 * 2.0 / s, 0.006))
    return _Frame(s, g, uu, vv, x, y, edge, (float(tx), float(ty), float(theta), float(scale)))


def _body(a: Anatomy, f: _Frame) -> tuple[np.ndarray, np.ndarray]:
    """A soft-edged thorax that narrows to the neck above the shoulders; density ~ path length. Returns the
    density and the body's half-width per row."""
    f32, x, y = np.float32, f.x, f.y
    w = f32(a.neck_w) + f32(a.body_w - a.neck_w) * sigmoid((y - f32(a.shoulder_y)) / f32(0.05))
    t = np.clip(1.0 - (x / w) ** 2, 0.0, 1.0)
    return f32(a.body_density) * np.sqrt(t) * sigmoid((w - np.abs(x)) / f.edge), w


@dataclass
class _Lungs:
    soft: np.ndarray  # 0-1 lung field, soft-edged
    mask: np.ndarray  # where a consolidation may appear
    domes: list[np.ndarray]  # each hemidiaphragm's height per pixel


def _lungs_and_mediastinum(a: Anatomy, f: _Frame, dens: np.ndarray) -> _Lungs:
    """Lungs (ellipses cut by the diaphragm domes, the mediastinum and the heart), heart, aortic knob, spine with
    vertebral bodies, gastric bubble under the left hemidiaphragm: added to ``dens`` in place."""
    f32, x, y, edge = np.float32, f.x, f.y, f.edge
    hx, hy = a.heart_c
    ha, hb = a.heart_ab
    rh2 = ((x - f32(hx)) / f32(ha)) ** 2 + ((y - f32(hy)) / f32(hb)) ** 2
    heart = sigmoid((f32(1.0) - np.sqrt(rh2)) * f32(min(ha, hb)) / edge)
    med_w = f32(a.mediastinum_w) + f32(0.03) * (y + f32(1.0))
    outside_med = sigmoid((np.abs(x - f32(0.01)) - med_w) / edge)
    lung_soft = np.zeros_like(x)
    lung_thick = np.zeros_like(x)
    domes = []
    for cx, la, dy in zip(a.lung_cx, a.lung_a, a.dome_y):
        r2 = ((x - f32(cx)) / f32(la)) ** 2 + ((y - f32(a.lung_cy)) / f32(a.lung_b)) ** 2
        inside = sigmoid((f32(1.0) - np.sqrt(r2)) * f32(min(la, a.lung_b)) / edge)
        dome = f32(dy) - f32(a.dome_h) * np.clip(1.0 - ((x - f32(cx)) / f32(1.15 * la)) ** 2, 0.0, 1.0)
        domes.append(dome)
        lung_soft += inside * sigmoid((dome - y) / edge)
        lung_thick += np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
    lung_soft *= outside_med * (f32(1.0) - heart)
    dens -= f32(a.lung_depth) * lung_soft * (f32(0.35) + f32(0.65) * lung_thick)
    dens += f32(a.heart_density) * heart * np.sqrt(np.clip(1.0 - rh2, 0.0, 1.0))
    dens += f32(0.05) * blob(x, y, 0.10, a.heart_c[1] - 0.52, 0.07, 0.06)
    spine = sigmoid((f32(0.055) - np.abs(x - f32(0.01))) / edge)
    vert = f32(0.85) + f32(0.15) * np.cos(f32(2 * np.pi) * (y - f32(a.rib_top)) / f32(a.rib_spacing))
    dens += f32(0.10) * spine * vert * sigmoid((y + f32(0.85)) / f32(0.05))
    if a.gastric_bubble > 0:
        bubble = blob(x, y, a.lung_cx[1] + 0.05, a.dome_y[1] + 0.09, 0.09, 0.05)
        dens -= f32(a.gastric_bubble) * bubble
    return _Lungs(lung_soft, lung_soft > 0.5, domes)


def _ribs_and_clavicles(
    a: Anatomy, f: _Frame, w: np.ndarray, domes: list[np.ndarray], view: View, dens: np.ndarray
) -> None:
    """Ribs (one periodic phase per family: posterior arches rise near the spine, anterior ribs run down towards the
    sternum; within the chest wall, above the domes), clavicles, and on an AP film the scapulae: added in place."""
    f32, x, y, edge = np.float32, f.x, f.y, f.edge
    xa = np.abs(x - f32(0.01))
    dome_lo = np.where(x < 0, domes[0], domes[1])
    chest = (
        sigmoid((f32(0.94) * w - xa) / edge)
        * sigmoid((xa - f32(0.05)) / edge)
        * sigmoid((dome_lo + f32(0.06) - y) / f32(0.03))
        * sigmoid((y - f32(a.rib_top) + f32(0.05)) / f32(0.03))
    )
    post = (y - f32(a.rib_top) - f32(0.9) * (xa - f32(0.15)) ** 2) / f32(a.rib_spacing)
    ant = (y - f32(a.rib_top) - f32(0.12) + f32(0.32) * xa) / f32(a.rib_spacing * 1.15)
    ribs = f32(a.rib_density) * bands(post, 8) + f32(0.35 * a.rib_density) * bands(ant, 6)
    dens += ribs * chest
    cl = y - (f32(a.clavicle_y) - f32(0.2) * (xa - f32(0.07)) + f32(0.25) * (xa - f32(0.35)) ** 2)
    clav = np.exp(-((cl / f32(0.024)) ** 2)) * sigmoid((xa - f32(0.06)) / edge)
    clav = clav * sigmoid((f32(0.62) - xa) / f32(0.02))
    dens += f32(0.08) * clav.astype(f32)
    if view == "AP":
        for sx in (-1, 1):
            dens += f32(0.035) * blob(x, y, sx * 0.68, -0.35, 0.12, 0.24)


def _lung_texture(
    a: Anatomy, sev: Severity, r_anat: np.random.Generator, f: _Frame, lung_soft: np.ndarray, dens: np.ndarray
) -> None:
    """Normal variation inside the lungs, added in place: vessel markings fanning out from the hila, breast and
    nipple shadows, and lesion-like blotches of every size (the distractors that keep this from being easy)."""
    f32, x, y = np.float32, f.x, f.y
    field_v = smooth_field(r_anat, f.s, 0.07)
    hilum = np.zeros_like(x)
    for sx in (-1, 1):
        hilum += np.exp(-np.sqrt((x - f32(sx * 0.16)) ** 2 + (y - f32(a.lung_cy + 0.05)) ** 2) / f32(0.3))
    vessels = np.exp(-((field_v / f32(0.22)) ** 2)) * hilum
    dens += f32(a.vessel_density) * vessels * lung_soft
    dens += f32(0.05) * blob(x, y, -0.16, a.lung_cy + 0.05, 0.06, 0.08) + f32(0.05) * blob(
        x, y, 0.16, a.lung_cy + 0.05, 0.06, 0.08
    )
    if a.breast > 0:
        for sx in (-1, 1):
            bx, by = sx * a.breast_c[0], a.breast_c[1]
            rb2 = ((x - f32(bx)) / f32(0.30)) ** 2 + ((y - f32(by)) / f32(0.20)) ** 2
            dens += f32(a.breast) * np.sqrt(np.clip(1.0 - rb2, 0.0, 1.0)) * sigmoid((f32(1.0) - rb2) / f32(0.05))
    if a.nipples:
        for sx in (-1, 1):
            dens += f32(0.05) * blob(x, y, sx * a.breast_c[0], a.breast_c[1] - 0.12, 0.022, 0.022)
    blot = smooth_field(r_anat, f.s, 0.09) + f32(0.6) * smooth_field(r_anat, f.s, 0.045)
    dens += f32(sev.distractor) * np.clip(blot - f32(0.3), 0.0, None) * lung_soft


def _lesions(
    positive: bool, sev: Severity, r_lesion: np.random.Generator, f: _Frame, lungs: _Lungs
) -> tuple[np.ndarray, int]:
    """Pneumonia: patchy consolidations, weighted to exactly zero outside the lung mask (none for a normal film).
    Returns the added density and how many consolidations."""
    f32, s, g = np.float32, f.s, f.g
    lesion = np.zeros_like(f.x)
    inner = np.clip((lungs.soft - f32(0.5)) * f32(2.0), 0.0, 1.0)  # exactly 0 outside the mask
    if not (positive and lungs.mask.any()):
        return lesion, 0
    n_lesions = 1 + int(r_lesion.poisson(sev.lesion_count))
    idx = np.flatnonzero(lungs.mask)
    rows = idx // s
    weight = (rows / s + 0.3).astype(np.float64)  # lower zones more often
    texture = smooth_field(r_lesion, s, 0.035)
    patchy = np.clip(f32(0.55) + f32(0.9) * texture, 0.0, 1.0)
    for _ in range(n_lesions):
        k = idx[r_lesion.choice(idx.size, p=weight / weight.sum())]
        cu, cv = g[k % s], g[k // s]
        sx_, sy_ = sev.lesion_size * r_lesion.uniform(0.6, 1.5, size=2)
        contrast = sev.lesion_contrast * r_lesion.uniform(0.6, 1.4)
        env = np.exp(-(((f.uu - cu) / f32(sx_)) ** 2 + ((f.vv - cv) / f32(sy_)) ** 2) / f32(2.0))
        lesion += f32(contrast) * env
    return (lesion * patchy * inner).astype(f32), n_lesions


def _exposure(sev: Severity, r_noise: np.random.Generator, f: _Frame):
    """The exposure of a density map: heel-effect gradient, per-image gain/offset and gamma, quantum and electronic
    noise, and a burnt-in marker. Drawn once, so the film and its lesion-free twin share them."""
    f32, s = np.float32, f.s
    gx, gy = r_noise.uniform(-0.08, 0.08, size=2) * sev.exposure
    gain = f32(r_noise.uniform(0.85, 1.1)) * (f32(1.0) + f32(gx) * f.uu + f32(gy) * f.vv)
    offset = f32(r_noise.uniform(0.02, 0.07))
    gamma = f32(np.exp(r_noise.normal(0.0, 0.12 * sev.exposure)))
    z = r_noise.standard_normal((s, s), dtype=f32)
    sigma = f32(sev.noise * s / 256.0)  # per-pixel noise that averages to the same SNR at 64 px
    marker = burnt_in_marker(r_noise, s)

    def expose(d: np.ndarray) -> np.ndarray:
        img = np.clip(offset + gain * d, 0.0, 1.0) ** gamma
        img = img + sigma * (f32(0.6) + f32(0.8) * img) * z
        img = np.maximum(img, marker)
        return np.clip(img, 0.0, 1.0).astype(f32)

    return expose
