"""read_image: any radiograph (DICOM, PNG, JPEG) from a path or bytes to a grey array, or one refusal line."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cxr.errors import UserError
from cxr.imaging.dicom_header import dicom_header, parse_dicom
from cxr.imaging.dicom_pixels import decode_pixels, grey_levels, is_decoder_panic
from cxr.imaging.dicom_stream import checked_stream
from cxr.imaging.limits import HeaderCheck, Image, ImageReadError, ReadLimits, check_pixels, check_size

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


JPEG_MAGIC = b"\xff\xd8\xff"


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
        if not is_decoder_panic(exc):
            raise  # KeyboardInterrupt, SystemExit, GeneratorExit: not the file's fault
        raise ImageReadError(f"{label}: cannot decode image (the decoder crashed on it)") from None
    check_pixels(image.pixels, limits, label)
    return image


def _no_check(header: dict[str, Any]) -> None:
    """The default header check: the reader's own refusals only."""


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
        check_size(rows, cols, limits, label)
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


def _read_dicom(data: bytes, limits: ReadLimits, label: str, check: HeaderCheck) -> Image:
    ds = parse_dicom(io.BytesIO(data), label)
    header = dicom_header(ds, limits, label)
    check(dict(header))
    frame = checked_stream(ds, header["rows"], header["cols"], label)
    raw = decode_pixels(ds, frame, label)
    if raw.ndim != 2:
        raise ImageReadError(f"{label}: expected one grayscale frame, decoded shape {raw.shape}")
    arr, voi, (lo, hi) = grey_levels(ds, raw, header["photometric"])
    return Image(np.ascontiguousarray(arr), {**header, "voi": voi, "range": (lo, hi)})
