"""Read a radiograph (DICOM, PNG or JPEG) from a path or bytes into a grayscale array.

The result is ``Image(pixels, meta)``: ``pixels`` is a float32 2-D array in display orientation
(bright = dense, as on a MONOCHROME2 film) and ``meta`` holds only non-identifying fields. The
patient id never leaves this package except as a salted hash (``meta["patient_key"]``), used to keep
all images of a patient in one split.

Everything the reader refuses raises :class:`ImageReadError` with a one-line message a user can act on, which
repeats no free-text header value (a field such as PhotometricInterpretation can hold anything, a patient id
included). A DICOM is refused from its header before any pixel is decoded: read limits, an optional caller's
check (the service's non-chest rule), and an encapsulated stream that is truncated or not the size the header says.

pydicom is imported where it is used: it takes ~0.3 s to import, and a PNG-only caller never needs it.

One module a job: ``reader`` (read_image), ``limits`` (what it returns and refuses), ``dicom_header``,
``dicom_stream``, ``dicom_pixels``, and ``patients`` (the salted key, the age).
"""

from cxr.imaging.dicom_header import dicom_header_meta
from cxr.imaging.limits import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    HeaderCheck,
    Image,
    ImageReadError,
    ReadLimits,
)
from cxr.imaging.patients import age_years, patient_key
from cxr.imaging.reader import read_image

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_SIDE",
    "HeaderCheck",
    "Image",
    "ImageReadError",
    "ReadLimits",
    "age_years",
    "dicom_header_meta",
    "patient_key",
    "read_image",
]
