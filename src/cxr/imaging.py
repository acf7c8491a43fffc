"""Read a radiograph (DICOM, PNG or JPEG) from a path or bytes into a grayscale array.

The result is ``Image(pixels, meta)``: ``pixels`` is a float32 2-D array in display orientation
(bright = dense, as on a MONOCHROME2 film) and ``meta`` holds only non-identifying fields. The
patient id never leaves this module except as a salted hash (``meta["patient_key"]``), used to keep
all images of a patient in one split.

Everything the reader refuses raises :class:`ImageReadError` with a message a user can act on.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxr.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
DEFAULT_MIN_SIDE = 16
DEFAULT_MAX_PIXELS = 60_000_000
DEFAULT_MAX_BYTES = 200 * 1024 * 1024
MAX_AGE_YEARS = 120  # older is a data-entry error (NIH's 2017 table has ages such as 414): unknown
_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([YMWD]?)$", re.IGNORECASE)
_AGE_PER_YEAR = {"": 1, "Y": 1, "M": 12, "W": 52.18, "D": 365.25}
# The salt keeps raw patient ids from being recoverable by hashing a list of known ids.
SALT_ENV = "CXR_PATIENT_SALT"
DEFAULT_SALT = "cxr-patient-key-v1"


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


def patient_key(patient_id: str | None, source: str = "") -> str | None:
    """Salted, truncated SHA-256 of a patient id: stable for splitting, not reversible to the id."""
    if patient_id is None or str(patient_id).strip() == "":
        return None
    salt = os.environ.get(SALT_ENV, DEFAULT_SALT)
    digest = hashlib.sha256(f"{salt}|{source}|{str(patient_id).strip()}".encode()).hexdigest()
    return digest[:16]


def read_image(src: str | Path | bytes, limits: ReadLimits | None = None, name: str | None = None) -> Image:
    """Decode one radiograph. Raises ImageReadError for anything it cannot use."""
    limits = limits or ReadLimits()
    label = name or (str(src) if not isinstance(src, (bytes, bytearray)) else "upload")
    data = _read_bytes(src, limits, label)
    try:
        if data.startswith(PNG_MAGIC) or data.startswith(JPEG_MAGIC):
            image = _read_raster(data, limits, label)
        else:
            image = _read_dicom(data, limits, label)
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError(f"{label}: image too large to decode in memory") from None
    except Exception as exc:  # a decoder's own error on a broken file is still a refused input
        raise ImageReadError(f"{label}: cannot decode image ({type(exc).__name__}: {exc})") from None
    except BaseException as exc:
        if not _is_decoder_panic(exc):
            raise  # KeyboardInterrupt, SystemExit, GeneratorExit: not the file's fault
        raise ImageReadError(f"{label}: cannot decode image (the decoder crashed on it: {exc})") from None
    _check_pixels(image.pixels, limits, label)
    return image


def _is_decoder_panic(exc: BaseException) -> bool:
    """A Rust decoder's panic (pyo3's PanicException, e.g. pylibjpeg-rle indexing past corrupt RLE data).

    pyo3 derives it from BaseException so that ``except Exception`` misses it, and each extension defines
    its own class, so it is recognised by name: a crash on a corrupt file is a refused input.
    """
    return any(c.__name__ == "PanicException" and c.__module__ == "pyo3_runtime" for c in type(exc).__mro__)


def _read_bytes(src: str | Path | bytes, limits: ReadLimits, label: str) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    else:
        path = Path(src)
        if not path.is_file():
            raise ImageReadError(f"{label}: no such file")
        if path.stat().st_size > limits.max_bytes:
            raise ImageReadError(f"{label}: file is larger than the {limits.max_bytes} byte limit")
        data = path.read_bytes()
    if not data:
        raise ImageReadError(f"{label}: empty file")
    if len(data) > limits.max_bytes:
        raise ImageReadError(f"{label}: input is larger than the {limits.max_bytes} byte limit")
    return data


def _check_size(rows: int, cols: int, limits: ReadLimits, label: str) -> None:
    """Refuse before decoding: a tiny header can announce a huge image (decompression bomb)."""
    if rows * cols > limits.max_pixels:
        raise ImageReadError(f"{label}: {cols}x{rows} pixels exceeds the limit of {limits.max_pixels} pixels")
    if min(rows, cols) < limits.min_side:
        raise ImageReadError(f"{label}: {cols}x{rows} is below the minimum side of {limits.min_side} pixels")


def _check_pixels(pixels: np.ndarray, limits: ReadLimits, label: str) -> None:
    if pixels.ndim != 2:
        raise ImageReadError(f"{label}: expected a single grayscale frame, got array shape {pixels.shape}")
    if not np.isfinite(pixels).all():
        raise ImageReadError(f"{label}: pixel data contains NaN or infinite values")
    if float(pixels.max()) == float(pixels.min()):
        raise ImageReadError(f"{label}: image is constant (every pixel is {float(pixels.min()):g})")


# --- PNG / JPEG -----------------------------------------------------------------------------------


def _read_raster(data: bytes, limits: ReadLimits, label: str) -> Image:
    from PIL import Image as PILImage

    kind = "png" if data.startswith(PNG_MAGIC) else "jpeg"
    with warnings.catch_warnings():
        # our own pixel limit is checked before decoding; PIL's warning would only add noise
        warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
        try:
            im = PILImage.open(io.BytesIO(data))  # reads the header only
        except PILImage.DecompressionBombError:
            raise ImageReadError(
                f"{label}: image dimensions exceed the limit of {limits.max_pixels} pixels (decompression bomb)"
            ) from None
        except OSError as exc:
            raise ImageReadError(f"{label}: truncated or corrupt {kind.upper()} ({exc})") from None
        cols, rows = im.size
        _check_size(rows, cols, limits, label)
        if getattr(im, "n_frames", 1) > 1:
            raise ImageReadError(f"{label}: multi-frame {kind.upper()} is not supported")
        try:
            im.load()
        except OSError as exc:
            raise ImageReadError(f"{label}: truncated or corrupt {kind.upper()} ({exc})") from None
    mode = im.mode
    bits = 8
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float32)
        bits = 16
    elif mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        bits = 32
    else:
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA").convert("RGB")  # drop alpha (PIL composites nothing: alpha ignored)
        arr = np.asarray(im.convert("L"), dtype=np.float32)
    meta = {
        "format": kind,
        "rows": rows,
        "cols": cols,
        "bits": bits,
        "input_mode": mode,
        "photometric": "MONOCHROME2",
        "range": (0.0, float(2**bits - 1) if bits <= 16 else float(arr.max())),
    }
    return Image(np.ascontiguousarray(arr, dtype=np.float32), meta)


# --- DICOM ----------------------------------------------------------------------------------------


def _read_dicom(data: bytes, limits: ReadLimits, label: str) -> Image:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    has_preamble = len(data) > 132 and data[128:132] == b"DICM"
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
    except InvalidDicomError:
        raise ImageReadError(f"{label}: not a DICOM, PNG or JPEG file") from None
    except Exception as exc:
        raise ImageReadError(f"{label}: not a readable DICOM, PNG or JPEG file ({type(exc).__name__})") from None

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if not has_preamble and len(ds) < 3:
            raise ImageReadError(f"{label}: not a DICOM, PNG or JPEG file")
        raise ImageReadError(f"{label}: DICOM has no pixel data")
    if "PixelData" not in ds:
        raise ImageReadError(f"{label}: float pixel data (parametric maps) is not a radiograph")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(f"{label}: multi-frame DICOM ({frames} frames) is not supported")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if not photometric:
        raise ImageReadError(f"{label}: DICOM has no PhotometricInterpretation, so its grey scale is unknown")
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(
            f"{label}: colour DICOM ({photometric or 'unknown'}, {samples} samples/pixel) is not a radiograph"
        )
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    except (AttributeError, TypeError, ValueError):
        raise ImageReadError(f"{label}: DICOM is missing Rows/Columns/BitsStored") from None
    _check_size(rows, cols, limits, label)
    if not 1 <= bits_stored <= 16:
        raise ImageReadError(f"{label}: {bits_stored}-bit pixel data is outside the supported 1-16 bits")

    try:
        raw = ds.pixel_array
    except BaseException as exc:
        if not isinstance(exc, Exception) and not _is_decoder_panic(exc):
            raise  # KeyboardInterrupt, SystemExit: not the file's fault
        syntax = _transfer_syntax(ds)
        raise ImageReadError(f"{label}: cannot decode DICOM pixel data ({syntax}): {exc}") from None
    if raw.ndim != 2:
        raise ImageReadError(f"{label}: expected one grayscale frame, decoded shape {raw.shape}")

    arr = apply_modality_lut(raw, ds)
    voi = "none"
    if "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds):
        try:
            arr = apply_voi_lut(arr, ds, index=0)
            voi = "lut" if "VOILUTSequence" in ds else "window"
        except (ValueError, TypeError, IndexError, AttributeError):
            voi = "invalid-ignored"  # a broken window header must not make the image unreadable
    lo, hi = _nominal_range(ds, raw, voi)
    arr = np.asarray(arr, dtype=np.float32)
    if photometric == "MONOCHROME1":
        arr = np.float32(lo + hi) - arr  # MONOCHROME1: low values are bright; flip so bone is bright
    meta = {
        "format": "dicom",
        "rows": rows,
        "cols": cols,
        "bits": bits_stored,
        "photometric": photometric,
        "transfer_syntax": _transfer_syntax(ds),
        "voi": voi,
        "range": (float(lo), float(hi)),
        "modality": str(ds.get("Modality", "")) or None,
        "body_part": str(ds.get("BodyPartExamined", "")).upper() or None,
        **_header_fields(ds),
    }
    return Image(np.ascontiguousarray(arr), meta)


def dicom_header_meta(path: str | Path) -> dict[str, Any]:
    """The non-identifying header fields of a DICOM file (view, sex, age, hashed patient key), read without
    its pixels; ``{}`` for a file that is not a readable DICOM (the reader refuses it later, with a reason)."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    except Exception:  # any unreadable header: no metadata, and the image read says why
        return {}
    return _header_fields(ds)


def _header_fields(ds: Any) -> dict[str, Any]:
    """View, sex, age and hashed patient key: the header fields a manifest keeps (no identifier in clear)."""
    return {
        "view": _view(ds),
        "sex": _sex(ds.get("PatientSex")),
        "age": age_years(ds.get("PatientAge")),
        "patient_key": patient_key(ds.get("PatientID"), "dicom"),
    }


def _nominal_range(ds: Any, raw: np.ndarray, voi: str) -> tuple[float, float]:
    """The output range of the last LUT applied, as the DICOM standard defines it."""
    if voi == "lut":
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        return 0.0, float(2 ** int(descriptor[2]) - 1)
    bits = int(ds.get("BitsStored", 8))
    if "ModalityLUTSequence" in ds:
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if "ModalityLUTSequence" not in ds and slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return (min(lo, hi), max(lo, hi))


def _transfer_syntax(ds: Any) -> str:
    try:
        return str(ds.file_meta.TransferSyntaxUID.name)
    except AttributeError:
        return "unknown"


def _view(ds: Any) -> str | None:
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    return view or None


def _sex(value: Any) -> str | None:
    v = str(value or "").strip().upper()[:1]
    return v if v in ("M", "F") else None


def age_years(value: Any) -> float | None:
    """An age in years from a DICOM Age String ("045Y", "006M", "003W", "010D") or a number of years as
    text ("58", as source tables write it). None when missing, unreadable or over MAX_AGE_YEARS. Whole
    years stay an int, so a manifest (and its dataset hash) reads as it did."""
    match = _AGE.match(str(value if value is not None else "").strip())
    if not match:
        return None
    number, unit = match.groups()
    per_year = _AGE_PER_YEAR[unit.upper()]
    n = float(number) if "." in number else int(number)
    years = n if per_year == 1 else n / per_year
    return years if years <= MAX_AGE_YEARS else None
