"""A DICOM's pixels decoded (pydicom's plugins, gdcm for 12-bit JPEG) and mapped to display grey levels."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from cxr.imaging.dicom_header import nominal_range, transfer_syntax
from cxr.imaging.limits import ImageReadError

JPEG_EXTENDED_12BIT = "1.2.840.10008.1.2.4.51"


# pydicom's plugins in pydicom's own order (its available_plugins is sorted by name), without gdcm.
DECODING_PLUGINS = ("pylibjpeg", "pillow", "pyjpegls", "pydicom")


def decode_pixels(ds: Any, frame: bytes | None, label: str) -> np.ndarray:
    try:
        return _decode(ds, frame)
    except BaseException as exc:
        if not isinstance(exc, Exception) and not is_decoder_panic(exc):
            raise  # KeyboardInterrupt, SystemExit: not the file's fault
        raise ImageReadError(
            f"{label}: cannot decode DICOM pixel data ({transfer_syntax(ds)}): corrupt, truncated or unsupported "
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


def grey_levels(ds: Any, raw: np.ndarray, photometric: str) -> tuple[np.ndarray, str, tuple[float, float]]:
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
    lo, hi = nominal_range(ds, raw, voi)
    arr = np.asarray(arr, dtype=np.float32)
    if photometric == "MONOCHROME1":
        arr = np.float32(lo + hi) - arr  # MONOCHROME1: low values are bright; flip so bone is bright
    return arr, voi, (float(lo), float(hi))


def is_decoder_panic(exc: BaseException) -> bool:
    """A Rust decoder's panic (pyo3's PanicException, e.g. pylibjpeg-rle indexing past corrupt RLE data).

    pyo3 derives it from BaseException so that ``except Exception`` misses it, and each extension defines
    its own class, so it is recognised by name: a crash on a corrupt file is a refused input.
    """
    return any(c.__name__ == "PanicException" and c.__module__ == "pyo3_runtime" for c in type(exc).__mro__)
