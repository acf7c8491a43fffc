"""An encapsulated DICOM codestream checked before decoding: whole, and the size its header says."""

from __future__ import annotations

import struct
from typing import Any

from cxr.imaging.limits import ImageReadError

STREAM_END = b"\xff\xd9"  # JPEG's EOI and JPEG 2000's EOC: the last marker of a whole codestream


# JPEG SOF0-SOF15 (not DHT C4, JPG C8, DAC CC) and JPEG-LS SOF55: the segments that give a frame's size.
JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}


def checked_stream(ds: Any, rows: int, cols: int, label: str) -> bytes | None:
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
