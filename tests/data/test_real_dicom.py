"""The reader on real radiographs (../shared/data/dicom) and on pydicom's own test files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames

from cxr.imaging import ImageReadError, read_image
from cxr.serving.input_checks import NotAChestError, refuse_non_chest

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
        "JPEG-lossy.dcm",  # 12-bit JPEG Extended that only GDCM reads
        "image_dfl.dcm",
        "MR_small_bigendian.dcm",
    ):
        assert expected in decoded, expected
    # colour and multi-frame are refused, never decoded as grey
    for expected in ("SC_rgb_rle.dcm", "SC_rgb_jpeg.dcm", "examples_ybr_color.dcm", "rtdose.dcm"):
        assert expected in refused, expected


def no_decoding(monkeypatch) -> None:
    def decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Dataset, "pixel_array", property(decode))


def rewritten(path: Path, stream: bytes | None = None, **attrs) -> bytes:
    """The file with header attributes changed and, given ``stream``, its one frame replaced."""
    ds = pydicom.dcmread(path)
    if stream is not None:
        ds.PixelData = encapsulate([stream])
    for k, v in attrs.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_real_chest_without_file_meta_reads_as_implicit_little_endian(dicom_dir: Path):
    path = next(dicom_dir.glob("nih_gcp_*.dcm"))  # stored Implicit VR Little Endian
    data = path.read_bytes()
    meta_length = int.from_bytes(data[140:144], "little")  # (0002,0000) UL: the file meta group's length
    acr_nema = data[144 + meta_length :]  # the same elements, no preamble, no file meta, no transfer syntax
    assert acr_nema[:2] == b"\x08\x00" and b"DICM" not in acr_nema[:256]
    img, original = read_image(acr_nema), read_image(path)
    assert np.array_equal(img.pixels, original.pixels)
    assert img.meta["transfer_syntax"] == "Implicit VR Little Endian"


def test_jpeg2000_whose_header_understates_its_size_is_refused_before_decoding(dicom_dir: Path, monkeypatch):
    lying = rewritten(dicom_dir / "wg04_RG1_J2KI_chest_CR_PA_jpeg2000.dcm", Rows=100, Columns=100)
    no_decoding(monkeypatch)
    with pytest.raises(ImageReadError, match="JPEG 2000 stream is 1841x1955 pixels, the header says 100x100"):
        read_image(lying)


def test_real_jpeg_cut_to_a_quarter_is_refused(dicom_dir: Path):
    path = next(dicom_dir.glob("siim_1.2.276*.dcm"))
    stream = next(generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1))
    with pytest.raises(ImageReadError, match="truncated or corrupt DICOM pixel data"):
        read_image(rewritten(path, stream[: len(stream) // 4]))


def test_the_tibia_is_refused_from_its_header(dicom_dir: Path, monkeypatch):
    no_decoding(monkeypatch)
    with pytest.raises(NotAChestError, match="BodyPartExamined=EXTREMITY"):
        read_image(dicom_dir / "wg04_RG3_J2KI_NONCHEST_extremity_jpeg2000.dcm", header_check=refuse_non_chest)
