"""DICOM files of a rendered film: DX or CR, 8 or 12 bits, rescale, window, MONOCHROME1, JPEG 2000."""

from __future__ import annotations

import datetime as _dt
import io
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from cxr.data.sources.synthetic.anatomy import Sex, View

_UID_ROOT = "cxr-synthetic-v1"


_DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


_CR = "1.2.840.10008.5.1.4.1.1.1"


_EPOCH = _dt.date(2015, 1, 1)


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

    ``rng`` draws the detector gain/offset, the study time and the window (in that order); ``uid_entropy`` makes
    the UIDs reproducible. A MONOCHROME1 dataset stores inverted values (and a mirrored window) so that a reader
    applying modality LUT, VOI window and the MONOCHROME1 inversion shows the same picture as the MONOCHROME2
    dataset made from the same image and the same ``rng`` state.
    """
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    arr = stored_values(image, replace(enc, monochrome1=False), rng)
    entropy = [str(e) for e in (_UID_ROOT, *uid_entropy)]

    def uid(kind: str) -> str:
        return generate_uid(entropy_srcs=[*entropy, kind])

    ds = Dataset()
    _identify(ds, enc, uid)
    _describe_study(ds, enc, rng, view=view, study_date=study_date)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient_name, patient_id, ""
    ds.PatientSex, ds.PatientAge = sex, f"{int(age):03d}Y"
    _add_pixels(ds, arr, enc, rng)
    return ds


def _identify(ds: Any, enc: Encoding, uid: Any) -> None:
    """The file meta and the SOP class and instance of a DX (for presentation) or CR image."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    sop_class = _DX_FOR_PRESENTATION if enc.modality == "DX" else _CR
    sop_uid = uid("sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid


def _describe_study(ds: Any, enc: Encoding, rng: np.random.Generator, *, view: View, study_date: _dt.date) -> None:
    """Study, series and acquisition attributes of a chest film, marked synthetic; the time drawn from ``rng``."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY"]
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
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.PatientOrientation = ["L", "F"]  # rows run to the patient's left, columns to the feet
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    if enc.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BurnedInAnnotation = "NO"


def _add_pixels(ds: Any, arr: np.ndarray, enc: Encoding, rng: np.random.Generator) -> None:
    """The image pixel module of stored values ``arr``: bit depth, rescale, a window (drawn from ``rng``),
    MONOCHROME1 inversion and, for ``enc.jpeg2000``, lossless JPEG 2000 compression."""
    from pydicom.uid import JPEG2000Lossless

    top = 255 if enc.bits == 8 else 4095
    rows, cols = arr.shape
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


def encode(ds: Any) -> bytes:
    """The dataset as DICOM Part 10 file bytes."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
