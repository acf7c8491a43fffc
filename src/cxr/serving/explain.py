"""Grad-CAM heatmaps and how much of the heat falls inside the lung fields.

``explain(predictor, image)`` is the one entry point (the service's ``explain`` API calls it): it
runs Grad-CAM on the model input, estimates a crude lung mask and returns the heatmap, the share of
the heat inside the lungs, a PNG overlay and warnings. A model that looks mostly outside the lungs
(at markers, borders, text) is a hint of shortcut learning.

The lung share is a number only when it means something; otherwise it is ``None`` and a warning
says which of the two reasons applies:

* the Grad-CAM is empty (no heat anywhere, the same heat everywhere, or not finite): no region raises
  the explained score at the explained layer (a score that ignores the image, or channel weights
  that are all negative, as in a barely trained network), so there is no region to show. A share
  of 0 would read as "the model looks outside the lungs";
* no lung mask could be estimated for this image (see below). This depends on the pixels only,
  never on the file format: a PNG/JPEG and a DICOM of the same film get the same mask.

Grad-CAM (Selvaraju et al., 2017): the gradient of the explained logit with respect to the last
spatial feature map (``CXRNet.gradcam_module``), averaged over space, weights the feature channels;
the ReLU of the weighted sum, upsampled to the input size and scaled to [0, 1], is the heatmap.

The lung mask is deliberately crude (no segmentation model): on a frontal film the lungs are the
dark regions inside two elliptical priors where the lungs of a centred PA/AP film lie. Inside each
prior, pixels below the prior's Otsu threshold are kept, the largest connected component is closed
and hole-filled. When a side yields too little (opaque lungs, an image that is not a frontal chest)
the mask is ``None`` and the share is reported as unknown rather than guessed.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from cxr.errors import UserError
from cxr.preprocess import preprocess

if TYPE_CHECKING:
    from cxr.imaging import Image
    from cxr.models import CXRNet
    from cxr.models.predictor import Predictor

ANALYSIS_SIZE = 128  # the lung mask and the share are computed on this grid (same geometry as the model input)
DISPLAY_SIZE = 384  # side of the PNG overlay
# Lung priors: centre row, half height, centre columns, half width, all as fractions of the side.
PRIOR_ROW, PRIOR_HALF_H, PRIOR_COLS, PRIOR_HALF_W = 0.47, 0.36, (0.30, 0.70), 0.20
MIN_PRIOR_STD = 0.02  # a flat prior region (blank image) has no lung to find
MIN_PRIOR_FILL = 0.2  # a side whose lung component covers less of its prior is not a usable estimate
# A heatmap (scaled to [0, 1]) whose range is below this holds no location: float noise, not heat.
MIN_HEAT_RANGE = 1e-6
EMPTY_GRADCAM = (
    "Grad-CAM is empty (no heat, or the same heat everywhere): no region of the image raises the model's score "
    "at the explained layer, so there is no region to show and no lung share"
)
NO_LUNG_MASK = (
    "no lung fields could be estimated on this image (not a frontal chest film, opaque lungs, or an unusual "
    "framing), so the share of the heat inside the lungs is unknown"
)


@dataclass
class Explanation:
    heatmap: np.ndarray  # float32 (S, S) in [0, 1] over the model input (S = preprocess size)
    label: str  # the label whose logit is explained
    probability: float  # the model's probability for that label
    lung_share: float | None  # fraction of the heat inside the lung mask; None when empty or no mask (warnings say)
    lung_area: float | None  # fraction of the image the lung mask covers (the share a uniform heatmap would get)
    png: bytes  # the heatmap over the image, lung outline drawn when estimated
    warnings: list[str]  # why the heatmap or the lung share is missing (empty when both are there)

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "probability": self.probability,
            "lung_share": self.lung_share,
            "lung_area": self.lung_area,
        }


def gradcam(model: "CXRNet", x: torch.Tensor, target: int = 0, tabular: torch.Tensor | None = None) -> np.ndarray:
    """Grad-CAM of logit ``target`` for one input ``x`` (1, 1, H, W) in [0, 1]: float32 (H, W) in [0, 1].

    The feature map is taken with a forward hook on ``model.gradcam_module``; the hook only records
    calls from this thread, so predictions running concurrently on the same model are not disturbed.
    """
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"gradcam explains one image at a time: expected (1, 1, H, W), got {tuple(x.shape)}")
    owner = threading.get_ident()
    captured: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        if threading.get_ident() == owner:
            captured.append(output)

    was_training = model.training
    model.eval()
    handle = model.gradcam_module.register_forward_hook(keep)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            logits = model(x.float().clone(), tabular)
            fmap = captured[-1]
            (grads,) = torch.autograd.grad(logits[0, target], fmap)
    finally:
        handle.remove()
        model.train(was_training)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * fmap).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    top = float(cam.max())
    return (cam / top if top > 0 else cam).cpu().numpy().astype(np.float32)


def _unit(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    return arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)


def _otsu(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of values in [0, 1]: the cut maximising the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    p = hist / max(hist.sum(), 1)
    mids = (edges[:-1] + edges[1:]) / 2
    w0, m0 = np.cumsum(p), np.cumsum(p * mids)
    between = (m0[-1] * w0 - m0) ** 2 / np.maximum(w0 * (1 - w0), 1e-12)
    return float(mids[int(np.argmax(between))])


def lung_mask(image: np.ndarray) -> np.ndarray | None:
    """Crude lung fields of a preprocessed frontal film (uint8 or [0, 1] float, square): bool mask or None."""
    from scipy import ndimage as ndi

    x = _unit(image)
    n = x.shape[0]
    x = ndi.gaussian_filter(x, n / 128)
    r = (np.arange(n) + 0.5) / n
    rows, cols = r[:, None], r[None, :]
    sides = []
    for centre in PRIOR_COLS:
        prior = ((rows - PRIOR_ROW) / PRIOR_HALF_H) ** 2 + ((cols - centre) / PRIOR_HALF_W) ** 2 <= 1
        if x[prior].std() < MIN_PRIOR_STD:  # nothing to separate
            return None
        dark = prior & (x < _otsu(x[prior]))
        dark = ndi.binary_opening(dark, iterations=max(1, n // 64))
        labels, count = ndi.label(dark)
        if count == 0:
            return None
        sizes = ndi.sum(dark, labels, range(1, count + 1))
        side = labels == 1 + int(np.argmax(sizes))
        side = ndi.binary_fill_holes(ndi.binary_closing(side, iterations=max(1, n // 32))) & prior
        if side.sum() < MIN_PRIOR_FILL * prior.sum():
            return None
        sides.append(side)
    return sides[0] | sides[1]


def is_empty(heatmap: np.ndarray) -> bool:
    """No location in a Grad-CAM map (values in [0, 1]): not finite, or (nearly) the same value everywhere."""
    heat = np.asarray(heatmap, dtype=np.float64)
    return not np.isfinite(heat).all() or float(np.ptp(heat)) < MIN_HEAT_RANGE


def lung_share(heatmap: np.ndarray, mask: np.ndarray) -> float | None:
    """Fraction of the total heat inside ``mask`` (both on the same grid); None for a map without heat."""
    total = float(heatmap.sum())
    return float(heatmap[mask].sum()) / total if total > 0 else None


def _resize(arr: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image as PILImage

    out = PILImage.fromarray(np.ascontiguousarray(arr, dtype=np.float32), mode="F")
    return np.asarray(out.resize((size, size), PILImage.Resampling.BILINEAR), dtype=np.float32)


def overlay_png(image: np.ndarray, heatmap: np.ndarray, mask: np.ndarray | None = None) -> bytes:
    """The heatmap (jet colours, opacity rising with heat) over a grey image, the mask's outline in white."""
    from matplotlib import colormaps
    from PIL import Image as PILImage
    from scipy import ndimage as ndi

    grey = _unit(image)
    size = grey.shape[0]
    heat = np.clip(_resize(heatmap, size), 0.0, 1.0)
    colour = colormaps["jet"](heat)[..., :3]
    alpha = (0.6 * heat)[..., None]
    rgb = grey[..., None] * (1 - alpha) + colour * alpha
    if mask is not None:
        m = _resize(mask.astype(np.float32), size) >= 0.5
        rgb[m & ~ndi.binary_erosion(m, iterations=max(1, size // 192))] = 1.0
    buf = io.BytesIO()
    PILImage.fromarray(np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def explain(predictor: "Predictor", image: "Image", label: str | None = None) -> Explanation:
    """Grad-CAM of one decoded image through the predictor's own preprocessing.

    ``label`` picks the explained output; the default is the positive class of a binary model and
    the most probable label otherwise.
    """
    # The network explains the film as given (test-time views are averaged for the score only); an ensemble
    # by the mean of its members' maps (each member has its own feature map).
    network = getattr(predictor.model, "network", predictor.model)
    networks = list(getattr(network, "members", [network]))
    if not hasattr(networks[0], "gradcam_module"):
        raise UserError(
            f"a {predictor.card.arch} model has no convolutional feature map, so there is no Grad-CAM to show"
        )
    x_u8 = predictor.prepare_input(image)
    x = torch.from_numpy(x_u8).to(predictor.device).float().div(255.0)[None, None]
    tab = predictor.tabular_for([image])
    tabular = torch.from_numpy(tab).to(predictor.device) if tab is not None else None
    probs = np.atleast_1d(predictor.predict_proba(x_u8[None], tab)[0])
    if predictor.task.binary:
        names = [predictor.labels[1]]  # one logit: the positive class
    else:
        names = list(predictor.labels)
    if label is None:
        index = int(np.argmax(probs))
    elif label in names:
        index = names.index(label)
    else:
        raise UserError(f"cannot explain label {label!r}: this model explains {', '.join(names)}")
    heat = np.mean([gradcam(net, x, index, tabular) for net in networks], axis=0)
    empty = is_empty(heat)
    # An empty map is shown as no heat at all (a uniform one would paint the whole film one colour).
    heat = np.zeros_like(heat) if empty else heat / heat.max()
    # The mask is estimated on a finer copy of the same preprocessing (same crop/pad geometry).
    fine = preprocess(image, replace(predictor.spec, size=ANALYSIS_SIZE))
    mask = lung_mask(fine)
    share = None if empty or mask is None else lung_share(_resize(heat, ANALYSIS_SIZE), mask)
    display = preprocess(image, replace(predictor.spec, size=DISPLAY_SIZE))
    return Explanation(
        heatmap=heat,
        label=names[index],
        probability=float(probs[index]),
        lung_share=None if share is None else round(share, 4),
        lung_area=None if mask is None else round(float(mask.mean()), 4),
        png=overlay_png(display, heat, mask),
        warnings=([EMPTY_GRADCAM] if empty else []) + ([NO_LUNG_MASK] if mask is None else []),
    )
