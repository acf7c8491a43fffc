"""The reader on real radiographs (../shared/data/dicom) and on pydicom's own test files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom.data
import pytest

from cxr.imaging import ImageReadError, read_image

pytestmark = pytest.mark.realdata


def test_fake_monochrome1_is_the_inverse_of_its_monochrome2_twin(dicom_dir: Path):
    mono2 = read_image(next(dicom_dir.glob("siim_1.2.276*.dcm")))
    mono1 = read_image(dicom_dir / "siim_Fake_MONOCHROME1_variant.dcm")
    assert mono1.meta["photometric"] == "MONOCHROME1" and mono2.meta["photometric"] == "MONOCHROME2"
    lo, hi = mono2.meta["range"]
    assert np.array_equal(mono1.pixels, (lo + hi) - mono2.pixels)


def test_jpeg2000_15bit_monochrome1_chest_has_dark_air(dicom_dir: Path):
    img = read_image(dicom_dir / "wg04_RG1_J2KI_chest_CR_PA_jpeg2000.dcm")
    assert img.meta["bits"] == 15 and img.meta["photometric"] == "MONOCHROME1"
    assert "2000" in img.meta["transfer_syntax"]
    px = img.pixels
    h, w = px.shape
    # The air above the shoulders (top outer corners) must be darker than the lung fields, which are
    # darker than the mediastinum; without the MONOCHROME1 flip the order is reversed.
    rows = slice(int(0.02 * h), int(0.08 * h))
    air = np.median(np.concatenate([px[rows, : int(0.08 * w)], px[rows, int(0.92 * w) :]], axis=1))
    lung = np.median(px[int(0.3 * h) : int(0.5 * h), int(0.25 * w) : int(0.35 * w)])
    mediastinum = np.median(px[h // 4 : 3 * h // 4, w // 2 - w // 20 : w // 2 + w // 20])
    assert air < lung < mediastinum


def test_every_real_dicom_decodes_with_plausible_metadata(dicom_dir: Path):
    for path in sorted(dicom_dir.glob("*.dcm")):
        img = read_image(path)
        assert img.pixels.ndim == 2 and min(img.pixels.shape) >= 1024
        assert img.meta["patient_key"] is None or len(img.meta["patient_key"]) == 16


def _pydicom_test_files() -> list[Path]:
    root = Path(pydicom.data.__file__).parent / "test_files"
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_pydicom_test_files_decode_or_are_refused_cleanly():
    files = _pydicom_test_files()
    assert len(files) > 100, "pydicom's bundled test files were not found"
    decoded, refused = [], []
    for path in files:
        try:
            img = read_image(path)
        except ImageReadError as exc:
            assert str(exc), path
            refused.append(path.name)
        else:
            assert img.pixels.ndim == 2 and np.isfinite(img.pixels).all(), path
            decoded.append(path.name)
    assert len(decoded) >= 20, decoded
    # grayscale in each compressed syntax the plugins handle: JPEG 2000, JPEG-LS, RLE, JPEG Extended, deflate
    for expected in (
        "JPEG2000.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_RLE.dcm",
        "JPGExtended.dcm",
        "image_dfl.dcm",
        "MR_small_bigendian.dcm",
    ):
        assert expected in decoded, expected
    # colour and multi-frame are refused, never decoded as grey
    for expected in ("SC_rgb_rle.dcm", "SC_rgb_jpeg.dcm", "examples_ybr_color.dcm", "rtdose.dcm"):
        assert expected in refused, expected
