"""A DICOM's header, parsed safely before any pixel: sniffing, element limits, the fields cxr keeps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from cxr.imaging.limits import ImageReadError, ReadLimits, check_size
from cxr.imaging.patients import age_years, patient_key

# A CR/DX header has a few hundred top-level elements; far more is junk parsed as elements (64 MB of zeros reads
# as 8 million empty ones, seconds per 10 MB while holding the GIL).
MAX_HEADER_ELEMENTS = 20_000


SNIFF_BYTES = 4096  # enough to hold a preamble and a file meta group


PIXEL_DATA_TAGS = 0x7FE00008  # (7FE0,0008) float, (7FE0,0009) double float, (7FE0,0010) pixel data


# PS3.3 C.7.6.3.1.2: the values a message may repeat; any other value is described, not quoted.
KNOWN_PHOTOMETRIC = frozenset(
    {
        "MONOCHROME1",
        "MONOCHROME2",
        "PALETTE COLOR",
        "RGB",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_PARTIAL_422",
        "YBR_PARTIAL_420",
        "YBR_ICT",
        "YBR_RCT",
        "HSV",
        "ARGB",
        "CMYK",
    }
)


def dicom_header_meta(path: str | Path) -> dict[str, Any]:
    """The non-identifying header fields of a DICOM file (view, sex, age, hashed patient key), read without
    its pixels; ``{}`` for a file that is not a readable DICOM (the reader refuses it later, with a reason)."""
    try:
        with open(path, "rb") as fp:
            ds = parse_dicom(fp, str(path), header_only=True)
    except Exception:  # any unreadable header: no metadata, and the image read says why
        return {}
    return _header_fields(ds)


def parse_dicom(fp: BinaryIO, label: str, header_only: bool = False) -> Any:
    """The data set, parsed only when its first bytes look like DICOM and stopped where junk begins."""
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_partial

    head = fp.read(SNIFF_BYTES)
    fp.seek(0)
    has_preamble = head[128:132] == b"DICM"
    if not _looks_like_dicom(head, has_preamble):
        raise ImageReadError(f"{label}: not a DICOM, PNG or JPEG file")
    try:
        ds = read_partial(fp, _element_limit(label, header_only), force=not has_preamble)
    except ImageReadError:
        raise
    except InvalidDicomError:
        raise ImageReadError(f"{label}: not a DICOM, PNG or JPEG file") from None
    except Exception as exc:
        raise ImageReadError(f"{label}: not a readable DICOM, PNG or JPEG file ({type(exc).__name__})") from None
    _default_transfer_syntax(ds)
    return ds


def _looks_like_dicom(head: bytes, has_preamble: bool) -> bool:
    """Whether a forced parse is worth trying: without a preamble the file must open with a group 0002 (file meta)
    or 0008 tag, little endian; and the data set never opens with the command group 0000, which pydicom reads
    without any stop (a file of zeros is millions of empty (0000,0000) elements)."""
    at = 132 if has_preamble else 0
    if not has_preamble and _group(head, at) not in (0x0002, 0x0008):
        return False
    if head[at : at + 8] == b"\x02\x00\x00\x00UL\x04\x00":  # (0002,0000) UL: the file meta group's length
        at += 12 + int.from_bytes(head[at + 8 : at + 12], "little")
    return _group(head, at) != 0x0000


def _group(head: bytes, at: int) -> int | None:
    """The little-endian tag group at ``at``; None past the sniffed bytes (nothing to say about it)."""
    return int.from_bytes(head[at : at + 2], "little") if len(head) >= at + 2 else None


def _element_limit(label: str, header_only: bool) -> Callable[[Any, str | None, int], bool]:
    """pydicom's stop_when: stop at the pixel data (header_only), refuse after MAX_HEADER_ELEMENTS elements."""
    seen = iter(range(MAX_HEADER_ELEMENTS))

    def stop(tag: Any, vr: str | None, length: int) -> bool:
        if next(seen, None) is None:
            raise ImageReadError(f"{label}: not a DICOM, PNG or JPEG file (over {MAX_HEADER_ELEMENTS} elements)")
        return header_only and tag >= PIXEL_DATA_TAGS

    return stop


def _default_transfer_syntax(ds: Any) -> None:
    """A file without a Transfer Syntax UID (ACR-NEMA, or a DICOM without file meta) is decoded in the encoding
    its elements were read in: Implicit VR Little Endian, the DICOM default, for an ACR-NEMA file."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" in ds.file_meta:
        return
    implicit, little = ds.original_encoding[:2]
    if implicit is False:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    else:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian


def dicom_header(ds: Any, limits: ReadLimits, label: str) -> dict[str, Any]:
    """The header's meta, after refusing from the header alone what no decoder should see."""
    photometric = _grey_photometric(ds, label)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    except (AttributeError, TypeError, ValueError):
        raise ImageReadError(f"{label}: DICOM is missing Rows/Columns/BitsStored") from None
    check_size(rows, cols, limits, label)
    if not 1 <= bits_stored <= 16:
        raise ImageReadError(f"{label}: {bits_stored}-bit pixel data is outside the supported 1-16 bits")
    return {
        "format": "dicom",
        "rows": rows,
        "cols": cols,
        "bits": bits_stored,
        "photometric": photometric,
        "transfer_syntax": transfer_syntax(ds),
        "modality": str(ds.get("Modality", "")) or None,
        "body_part": str(ds.get("BodyPartExamined", "")).upper() or None,
        **_header_fields(ds),
    }


def _grey_photometric(ds: Any, label: str) -> str:
    """MONOCHROME1 or MONOCHROME2 of a single-frame image with pixel data; anything else is refused."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if ds.preamble is None and len(ds) < 3:
            raise ImageReadError(f"{label}: not a DICOM, PNG or JPEG file")
        raise ImageReadError(f"{label}: DICOM has no pixel data")
    if "PixelData" not in ds:
        raise ImageReadError(f"{label}: float pixel data (parametric maps) is not a radiograph")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(f"{label}: multi-frame DICOM ({frames} frames) is not supported")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if not photometric:
        raise ImageReadError(f"{label}: DICOM has no PhotometricInterpretation, so its grey scale is unknown")
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        shown = photometric if photometric in KNOWN_PHOTOMETRIC else "an unrecognised PhotometricInterpretation"
        raise ImageReadError(f"{label}: colour DICOM ({shown}, {samples} samples/pixel) is not a radiograph")
    return photometric


def _header_fields(ds: Any) -> dict[str, Any]:
    """View, sex, age and hashed patient key: the header fields a manifest keeps (no identifier in clear)."""
    return {
        "view": _view(ds),
        "sex": _sex(ds.get("PatientSex")),
        "age": age_years(ds.get("PatientAge")),
        "patient_key": patient_key(ds.get("PatientID"), "dicom"),
    }


def nominal_range(ds: Any, raw: np.ndarray, voi: str) -> tuple[float, float]:
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


def transfer_syntax(ds: Any) -> str:
    """The transfer syntax's name when pydicom knows it; never the file's own text (it may be anything)."""
    from pydicom.uid import UID_dictionary

    try:
        uid = str(ds.file_meta.TransferSyntaxUID)
    except AttributeError:
        return "unknown"
    name, kind = UID_dictionary.get(uid, ("", ""))[:2]
    return name if kind == "Transfer Syntax" else "unrecognised"


def _view(ds: Any) -> str | None:
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    return view or None


def _sex(value: Any) -> str | None:
    v = str(value or "").strip().upper()[:1]
    return v if v in ("M", "F") else None
