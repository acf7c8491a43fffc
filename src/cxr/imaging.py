"""Read a radiograph (DICOM, PNG or JPEG) from a path or bytes into a grayscale array.

The result is ``Image(pixels, meta)``: ``pixels`` is a float32 2-D array in display orientation
(bright = dense, as on a MONOCHROME2 film) and ``meta`` holds only non-identifying fields. The
patient id never leaves this module except as a salted hash (``meta["patient_key"]``), used to keep
all images of a patient in one split.

Everything the reader refuses raises :class:`ImageReadError` with a one-line message a user can act on, which
repeats no free-text header value (a field such as PhotometricInterpretation can hold anything, a patient id
included). A DICOM is refused from its header before any pixel is decoded: read limits, an optional caller's
check (the service's non-chest rule), and an encapsulated stream that is truncated or not the size the header says.

pydicom is imported where it is used: it takes ~0.3 s to import, and a PNG-only caller never needs it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

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
# A CR/DX header has a few hundred top-level elements; far more is junk parsed as elements (64 MB of zeros reads
# as 8 million empty ones, seconds per 10 MB while holding the GIL).
MAX_HEADER_ELEMENTS = 20_000
SNIFF_BYTES = 4096  # enough to hold a preamble and a file meta group
PIXEL_DATA_TAGS = 0x7FE00008  # (7FE0,0008) float, (7FE0,0009) double float, (7FE0,0010) pixel data
STREAM_END = b"\xff\xd9"  # JPEG's EOI and JPEG 2000's EOC: the last marker of a whole codestream
# JPEG SOF0-SOF15 (not DHT C4, JPG C8, DAC CC) and JPEG-LS SOF55: the segments that give a frame's size.
JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
# PS3.3 C.7.6.3.1.2: the values a message may repeat; any other value is described, not quoted.
KNOWN_PHOTOMETRIC = frozenset(
    {"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422",
     "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "HSV", "ARGB", "CMYK"}
)  # fmt: skip
JPEG_EXTENDED_12BIT = "1.2.840.10008.1.2.4.51"
# pydicom's plugins in pydicom's own order (its available_plugins is sorted by name), without gdcm.
DECODING_PLUGINS = ("pylibjpeg", "pillow", "pyjpegls", "pydicom")

HeaderCheck = Callable[[dict[str, Any]], None]


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


def read_image(
    src: str | Path | bytes,
    limits: ReadLimits | None = None,
    name: str | None = None,
    header_check: HeaderCheck | None = None,
) -> Image:
    """Decode one radiograph. Raises ImageReadError (or header_check's UserError) for anything it cannot use.

    Args:
        src: a path, or the file's bytes.
        limits: the size limits, checked on the header before decoding.
        name: how messages name the input (default: the path, or "upload").
        header_check: called with the header's meta (format, rows, cols; for a DICOM also modality, body part,
            view) before any pixel is decoded; it refuses the input by raising a UserError.
    """
    limits = limits or ReadLimits()
    label = name or (str(src) if not isinstance(src, (bytes, bytearray)) else "upload")
    data = _read_bytes(src, limits, label)
    check = header_check or _no_check
    try:
        if data.startswith(PNG_MAGIC) or data.startswith(JPEG_MAGIC):
            image = _read_raster(data, limits, label, check)
        else:
            image = _read_dicom(data, limits, label, check)
    except UserError:
        raise
    except MemoryError:
        raise ImageReadError(f"{label}: image too large to decode in memory") from None
    except Exception as exc:  # a decoder's own error on a broken file is still a refused input
        # only the type: the text of a parser's error may quote a header value
        raise ImageReadError(f"{label}: cannot decode image ({type(exc).__name__})") from None
    except BaseException as exc:
        if not _is_decoder_panic(exc):
            raise  # KeyboardInterrupt, SystemExit, GeneratorExit: not the file's fault
        raise ImageReadError(f"{label}: cannot decode image (the decoder crashed on it)") from None
    _check_pixels(image.pixels, limits, label)
    return image


def _no_check(header: dict[str, Any]) -> None:
    """The default header check: the reader's own refusals only."""


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


def _read_raster(data: bytes, limits: ReadLimits, label: str, check: HeaderCheck) -> Image:
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
        check({"format": kind, "rows": rows, "cols": cols})
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


def _read_dicom(data: bytes, limits: ReadLimits, label: str, check: HeaderCheck) -> Image:
    ds = _parse_dicom(io.BytesIO(data), label)
    header = _dicom_header(ds, limits, label)
    check(dict(header))
    frame = _checked_stream(ds, header["rows"], header["cols"], label)
    raw = _decode_pixels(ds, frame, label)
    if raw.ndim != 2:
        raise ImageReadError(f"{label}: expected one grayscale frame, decoded shape {raw.shape}")
    arr, voi, (lo, hi) = _grey_levels(ds, raw, header["photometric"])
    return Image(np.ascontiguousarray(arr), {**header, "voi": voi, "range": (lo, hi)})


def dicom_header_meta(path: str | Path) -> dict[str, Any]:
    """The non-identifying header fields of a DICOM file (view, sex, age, hashed patient key), read without
    its pixels; ``{}`` for a file that is not a readable DICOM (the reader refuses it later, with a reason)."""
    try:
        with open(path, "rb") as fp:
            ds = _parse_dicom(fp, str(path), header_only=True)
    except Exception:  # any unreadable header: no metadata, and the image read says why
        return {}
    return _header_fields(ds)


def _parse_dicom(fp: BinaryIO, label: str, header_only: bool = False) -> Any:
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


def _dicom_header(ds: Any, limits: ReadLimits, label: str) -> dict[str, Any]:
    """The header's meta, after refusing from the header alone what no decoder should see."""
    photometric = _grey_photometric(ds, label)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    except (AttributeError, TypeError, ValueError):
        raise ImageReadError(f"{label}: DICOM is missing Rows/Columns/BitsStored") from None
    _check_size(rows, cols, limits, label)
    if not 1 <= bits_stored <= 16:
        raise ImageReadError(f"{label}: {bits_stored}-bit pixel data is outside the supported 1-16 bits")
    return {
        "format": "dicom",
        "rows": rows,
        "cols": cols,
        "bits": bits_stored,
        "photometric": photometric,
        "transfer_syntax": _transfer_syntax(ds),
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


def _checked_stream(ds: Any, rows: int, cols: int, label: str) -> bytes | None:
    """The encapsulated JPEG or JPEG 2000 frame (None for other syntaxes), checked before decoding: it must end in
    its end marker (a truncated stream decodes to a plausible part-grey film) and be the size the header says (a
    100x100 header must not make the decoder allocate the 1955x1841 its stream holds)."""
    kind = _stream_kind(ds.file_meta.TransferSyntaxUID)
    if kind is None:
        return None
    frame = _first_frame(ds, label)
    if not frame.rstrip(b"\x00\xff").endswith(STREAM_END):  # fragments are padded to an even length
        raise ImageReadError(f"{label}: truncated or corrupt DICOM pixel data (the {kind} stream has no end marker)")
    size = _j2k_size(frame) if kind == "JPEG 2000" else _jpeg_size(frame)
    if size is None:
        raise ImageReadError(f"{label}: truncated or corrupt DICOM pixel data (no {kind} frame header)")
    if size != (rows, cols):
        raise ImageReadError(
            f"{label}: truncated or corrupt DICOM pixel data (the {kind} stream is {size[1]}x{size[0]} pixels, "
            f"the header says {cols}x{rows})"
        )
    return frame


def _stream_kind(syntax: Any) -> str | None:
    """The codestream family of an encapsulated syntax: JPEG (with JPEG-LS), JPEG 2000 (with HTJ2K), or None."""
    from pydicom import uid

    if syntax in uid.JPEG2000TransferSyntaxes:
        return "JPEG 2000"
    if syntax in uid.JPEGTransferSyntaxes or syntax in uid.JPEGLSTransferSyntaxes:
        return "JPEG"
    return None


def _first_frame(ds: Any, label: str) -> bytes:
    from pydicom.encaps import generate_frames

    try:
        return next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception:  # a fragment table pydicom cannot walk
        raise ImageReadError(f"{label}: truncated or corrupt DICOM pixel data (unreadable fragments)") from None


def _j2k_size(stream: bytes) -> tuple[int, int] | None:
    """(rows, cols) from the SIZ segment that follows SOC (also inside a JP2 wrapper), or None."""
    at = stream.find(b"\xff\x4f\xff\x51")  # at 0 in a bare codestream
    if at < 0 or len(stream) < at + 24:
        return None
    x, y, x0, y0 = struct.unpack(">IIII", stream[at + 8 : at + 24])  # Xsiz, Ysiz, XOsiz, YOsiz
    return y - y0, x - x0


def _jpeg_size(stream: bytes) -> tuple[int, int] | None:
    """(rows, cols) from the frame header (SOFn, JPEG-LS SOF55), walking the marker segments after SOI; or None."""
    at = 2 if stream.startswith(b"\xff\xd8") else len(stream)
    while at + 9 <= len(stream) and stream[at] == 0xFF:
        marker = stream[at + 1]
        if marker in JPEG_FRAME_MARKERS:
            rows, cols = struct.unpack(">HH", stream[at + 5 : at + 9])
            return rows, cols
        if marker in (0xDA, 0xD9):  # start of scan or end of image: no frame header came first
            return None
        at += 1 if marker == 0xFF else 2 + struct.unpack(">H", stream[at + 2 : at + 4])[0]  # fill byte, segment
    return None


def _decode_pixels(ds: Any, frame: bytes | None, label: str) -> np.ndarray:
    try:
        return _decode(ds, frame)
    except BaseException as exc:
        if not isinstance(exc, Exception) and not _is_decoder_panic(exc):
            raise  # KeyboardInterrupt, SystemExit: not the file's fault
        raise ImageReadError(
            f"{label}: cannot decode DICOM pixel data ({_transfer_syntax(ds)}): corrupt, truncated or unsupported "
            f"({type(exc).__name__})"
        ) from None


def _decode(ds: Any, frame: bytes | None) -> np.ndarray:
    """pydicom's plugins in pydicom's order but without gdcm; then, for 12-bit JPEG Extended only, GDCM."""
    try:
        return _decode_with_plugins(ds)
    except Exception:
        if frame is None or not _is_12bit_jpeg(ds):
            raise
    return _decode_12bit_jpeg(ds, frame)


def _decode_with_plugins(ds: Any) -> np.ndarray:
    """ds.pixel_array with each of pydicom's plugins but gdcm in turn: installing python-gdcm (for 12-bit JPEG)
    must not change the decoder, hence the pixels, of a file pylibjpeg or Pillow decoded before."""
    from pydicom.pixels import get_decoder

    logging.getLogger("pydicom.pixels.decoders.base").addFilter(_without_traceback)  # idempotent
    available = get_decoder(ds.file_meta.TransferSyntaxUID).available_plugins
    *first, last = [p for p in DECODING_PLUGINS if p in available] or [""]  # "": a native syntax, no plugins
    for plugin in first:
        try:
            return _pixel_array(ds, plugin)
        except Exception:
            pass  # the next plugin may read it; the last one's error is the one reported
    return _pixel_array(ds, last)


def _pixel_array(ds: Any, plugin: str) -> np.ndarray:
    ds.pixel_array_options(decoding_plugin=plugin)
    return ds.pixel_array


def _without_traceback(record: logging.LogRecord) -> bool:
    """pydicom logs each failed plugin's traceback before raising; the refusal says it once, in one line."""
    return record.exc_info is None


def _is_12bit_jpeg(ds: Any) -> bool:
    return (
        ds.file_meta.TransferSyntaxUID == JPEG_EXTENDED_12BIT
        and int(ds.get("BitsAllocated", 0)) == 16
        and 8 < int(ds.get("BitsStored", 0)) <= 12
        and int(ds.get("PixelRepresentation", 0)) == 0
    )


def _decode_12bit_jpeg(ds: Any, frame: bytes) -> np.ndarray:
    """A 12-bit JPEG Extended frame through GDCM's IJG 12-bit codec, which reads process 2 & 4 streams from CR
    archives that pylibjpeg-libjpeg rejects ("misplaced marker segment"); pydicom's own gdcm plugin refuses 12
    bits, so GDCM is called directly, as that plugin calls it. GDCM may print libjpeg notes to stderr."""
    import gdcm  # a native decoder this one transfer syntax needs

    rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsStored)
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(frame)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((cols, rows, 1))
    image.SetDataElement(element)
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(gdcm.PhotometricInterpretation.MONOCHROME2))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(JPEG_EXTENDED_12BIT)))
    image.SetPixelFormat(gdcm.PixelFormat(1, 16, bits, bits - 1, 0))
    buffer = image.GetBuffer()  # None when GDCM cannot decode the stream
    pixels = np.frombuffer(buffer.encode("utf-8", "surrogateescape") if buffer else b"", np.uint16)
    if pixels.size != rows * cols:
        raise ValueError("GDCM could not decode the 12-bit JPEG stream")
    return pixels.reshape(rows, cols)


def _grey_levels(ds: Any, raw: np.ndarray, photometric: str) -> tuple[np.ndarray, str, tuple[float, float]]:
    """Modality LUT, then VOI LUT or window, then MONOCHROME1 flipped: (float32 pixels, voi, nominal range)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

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
    return arr, voi, (float(lo), float(hi))


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
