"""Uploads for the serving tests: synthetic chest films as DICOM or PNG bytes."""

from __future__ import annotations

import datetime as dt
import io

import numpy as np
from PIL import Image as PILImage

from cxr.data.sources.synthetic import Encoding, encode, make_dataset, render

# Fictitious identifying fields a DICOM upload may carry and no answer or log may echo.
IDENTIFYING = {"patient_name": "Doe^Jane", "patient_id": "MRN-998877", "study_date": dt.date(2024, 2, 29)}
BIRTH_DATE = "19700101"


def chest_dicom(
    seed: int = 0, size: int = 64, *, label: int = 0, monochrome1: bool = False, identifying: bool = False, **header
) -> bytes:
    """A synthetic chest DICOM; ``identifying`` adds the fields above; ``header`` sets any other attribute."""
    rng = np.random.default_rng(seed)
    ids = IDENTIFYING if identifying else {}
    ds = make_dataset(render(rng, label, 0.6, size), Encoding(monochrome1=monochrome1), rng, **ids)
    if identifying:
        ds.PatientBirthDate = BIRTH_DATE
    for key, value in header.items():
        setattr(ds, key, value)
    return encode(ds)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
