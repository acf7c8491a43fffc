"""What the service says about an input before trusting a prediction on it: refusals and warnings.

Refused (``NotAChestError``, a ``UserError``): a DICOM whose header states a body part other than the
chest, or a modality that is not projection radiography. The header is explicit evidence, and a
pneumonia probability for a tibia or a CT slice is an answer to a question nobody asked.

Warned (the prediction is returned, with the reason it may be unreliable):

* a DICOM whose ViewPosition is non-frontal (other than PA/AP) or missing: the models are trained on
  frontal films. PNG/JPEG carry no view at all, so warning on every one of them would say nothing
  about the film; they get no view warning (the image statistics below still apply);
* an image far from chest radiographs in general: three cheap statistics of the preprocessed model
  input (values in [0, 1]) against bands measured on real frontal chest films. model.json carries no
  image statistics of the training set, so the reference is the chest-film population itself:
  measured on 1,044 Kermany, 471 PneumoniaMNIST, 2 NIH, 4 chest DICOMs (shared test data) and 200
  synthetic films, mean 0.33-0.85, standard deviation 0.15-0.37, and the mediastinum (central
  column) brighter than the lung fields by 0.07-0.55 in 99% of films (0.15% of 2,608 Kermany films,
  every second one, fall below 0.02, at 32 and at 224 px). An inverted grey scale (wrong MONOCHROME1
  handling) gives -0.4 to -0.1, the NEMA tibia -0.06, noise 0.0.

A message repeats a header value only when it is a known DICOM term; any other value is described ("an
unrecognised ViewPosition"), since a free-text field can hold anything, a patient id included. ``refuse_non_chest``
reads only the header, so it can run as ``cxr.imaging.read_image``'s ``header_check``, before any pixel is decoded.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cxr.errors import UserError

CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "CHEST_LAT", "PORTABLE CHEST"})
# Modalities that are certainly not a projection radiograph of the chest.
NOT_RADIOGRAPHY = frozenset({"CT", "MR", "US", "NM", "PT", "MG", "OP", "OPT", "SM", "XC", "ES", "IVUS", "OCT"})
FRONTAL_VIEWS = frozenset({"PA", "AP"})
# The values a message may repeat: ViewPosition's defined terms (PS3.3 C.8.11.5.1.1) and common vendor spellings,
# BodyPartExamined's defined terms (PS3.16 Annex L) for the regions a radiograph shows.
KNOWN_VIEWS = FRONTAL_VIEWS | {"LL", "RL", "LLD", "RLD", "LLO", "RLO", "LAT", "LATERAL", "AP AXIAL", "PA AXIAL"}
KNOWN_BODY_PARTS = CHEST_BODY_PARTS | {
    "ABDOMEN",
    "ANKLE",
    "ARM",
    "BREAST",
    "CALCANEUS",
    "CLAVICLE",
    "COCCYX",
    "CSPINE",
    "ELBOW",
    "EXTREMITY",
    "FEMUR",
    "FINGER",
    "FOOT",
    "FOREARM",
    "HAND",
    "HEAD",
    "HEART",
    "HIP",
    "HUMERUS",
    "JAW",
    "KNEE",
    "LEG",
    "LSPINE",
    "NECK",
    "PELVIS",
    "RIB",
    "SACRUM",
    "SCAPULA",
    "SHOULDER",
    "SKULL",
    "SPINE",
    "SSPINE",
    "TOE",
    "TSPINE",
    "WHOLEBODY",
    "WRIST",
    "ZYGOMA",
}

MEAN_RANGE = (0.25, 0.90)
STD_RANGE = (0.14, 0.42)
MIN_MEDIASTINUM_CONTRAST = 0.02


class NotAChestError(UserError):
    """The DICOM header says the image is not a chest radiograph."""


def refuse_non_chest(meta: dict[str, Any], label: str = "upload") -> None:
    body_part = (meta.get("body_part") or "").strip().upper()
    if body_part and body_part not in CHEST_BODY_PARTS:
        shown = _shown(body_part, KNOWN_BODY_PARTS, "BodyPartExamined")
        raise NotAChestError(
            f"{label}: the DICOM header names a body part other than the chest ({shown}); "
            "this model reads chest radiographs only"
        )
    modality = (meta.get("modality") or "").strip().upper()
    if modality in NOT_RADIOGRAPHY:  # a known term, so it may be repeated
        raise NotAChestError(
            f"{label}: the DICOM header says Modality={modality}; this model reads chest radiographs only"
        )


def _shown(value: str, known: frozenset[str], field: str) -> str:
    """How a message repeats a header value: the value when it is a known term, else only that it is unknown."""
    return f"{field}={value}" if value in known else f"an unrecognised {field}"


def image_stats(x: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation and mediastinum-minus-lungs contrast of a preprocessed (square) input."""
    arr = np.asarray(x)
    v = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
    n = v.shape[0]
    band = v[int(0.25 * n) : int(0.65 * n)]  # from below the clavicles to above the diaphragm
    centre = band[:, int(0.42 * n) : int(0.58 * n)].mean()
    lungs = (band[:, int(0.15 * n) : int(0.35 * n)].mean() + band[:, int(0.65 * n) : int(0.85 * n)].mean()) / 2
    return {"mean": float(v.mean()), "std": float(v.std()), "mediastinum_contrast": float(centre - lungs)}


def input_warnings(meta: dict[str, Any], x: np.ndarray, stats: dict[str, float] | None = None) -> list[str]:
    """Reasons a prediction on this input may be unreliable (empty when none); ``stats``: image_stats(x) if known."""
    out: list[str] = []
    view = (meta.get("view") or "").strip().upper()
    if not view:
        if meta.get("format") == "dicom":  # the one format that could have said
            out.append("view unknown (no DICOM ViewPosition): the model expects a frontal PA or AP chest film")
    elif view not in FRONTAL_VIEWS:
        shown = _shown(view, KNOWN_VIEWS, "ViewPosition")
        out.append(f"non-frontal view ({shown}): the model was trained on frontal PA/AP chest films")
    s = stats or image_stats(x)
    odd = []
    if not MEAN_RANGE[0] <= s["mean"] <= MEAN_RANGE[1]:
        odd.append(f"mean {s['mean']:.2f} outside {MEAN_RANGE[0]}-{MEAN_RANGE[1]}")
    if not STD_RANGE[0] <= s["std"] <= STD_RANGE[1]:
        odd.append(f"contrast (std) {s['std']:.2f} outside {STD_RANGE[0]}-{STD_RANGE[1]}")
    if s["mediastinum_contrast"] < MIN_MEDIASTINUM_CONTRAST:
        odd.append(
            f"centre not brighter than the lung fields ({s['mediastinum_contrast']:+.2f}; "
            "inverted grey scale, not a frontal chest film, or not a radiograph)"
        )
    if odd:
        out.append("image is far from the chest radiographs the model was built for: " + "; ".join(odd))
    return out
