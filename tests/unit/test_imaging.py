"""The reader: correct DICOM grey-scale handling, rasters, refusals and no PHI."""

from __future__ import annotations

import io
import json

import numpy as np
import pydicom
import pytest
from PIL import Image as PILImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxr.imaging import ImageReadError, ReadLimits, age_years, patient_key, read_image
from support.reader_fuzz import rle_with_one_flipped_bit


def make_dicom(pixels: np.ndarray, **attrs) -> bytes:
    """A minimal valid DICOM with the given pixels and header attributes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "MRN-123456"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.PatientAge = "054Y"
    ds.Modality = "DX"
    ds.ViewPosition = "PA"
    bits = 16 if pixels.dtype == np.uint16 else 8
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = bits
    ds.BitsStored = attrs.pop("BitsStored", bits)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def ramp(h: int = 64, w: int = 64, hi: int = 4095, dtype=np.uint16) -> np.ndarray:
    return (np.linspace(0, hi, h * w).reshape(h, w)).astype(dtype)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="PNG")  # uint16 -> 16-bit PNG
    return buf.getvalue()


def test_modality_lut_then_window_then_monochrome1_inversion():
    px = ramp(hi=4095)
    plain = read_image(make_dicom(px, BitsStored=12))
    rescaled = read_image(make_dicom(px, BitsStored=12, RescaleSlope=2, RescaleIntercept=-100))
    assert np.allclose(rescaled.pixels, plain.pixels * 2 - 100)
    windowed = read_image(make_dicom(px, BitsStored=12, WindowCenter=2048, WindowWidth=1024))
    # inside the window the output is linear, outside it is clipped to the output range
    assert windowed.pixels.min() == 0 and windowed.pixels.max() == 4095
    assert windowed.meta["voi"] == "window"
    mono1 = read_image(make_dicom(px, BitsStored=12, PhotometricInterpretation="MONOCHROME1"))
    assert np.allclose(mono1.pixels, 4095 - plain.pixels)
    assert mono1.meta["photometric"] == "MONOCHROME1"


def test_window_applies_to_rescaled_values():
    px = ramp(hi=1000)
    img = read_image(
        make_dicom(px, BitsStored=12, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=-524, WindowWidth=200)
    )
    # values below centre-width/2 (in rescaled units) are at the floor of the output range
    lo = img.meta["range"][0]
    assert np.isclose(img.pixels[0, 0], lo) and img.pixels[-1, -1] > img.pixels[0, 0]


def test_metadata_has_no_phi_only_a_salted_key():
    img = read_image(make_dicom(ramp(), BitsStored=12))
    text = json.dumps(img.meta, default=str)
    for phi in ("Doe", "MRN-123456", "19700101"):
        assert phi not in text
    assert img.meta["patient_key"] == patient_key("MRN-123456", "dicom")
    assert img.meta["sex"] == "F" and img.meta["age"] == 54 and img.meta["view"] == "PA"


def test_patient_key_depends_on_salt(monkeypatch):
    a = patient_key("p1")
    monkeypatch.setenv("CXR_PATIENT_SALT", "other")
    assert patient_key("p1") != a and patient_key("") is None


@pytest.mark.parametrize("dtype,maxval", [(np.uint8, 255), (np.uint16, 65535)])
def test_png_8_and_16_bit(dtype, maxval):
    arr = ramp(hi=maxval, dtype=dtype)
    img = read_image(png_bytes(arr))
    assert img.pixels.shape == arr.shape
    assert np.allclose(img.pixels, arr.astype(np.float32))
    assert img.meta["bits"] == (16 if dtype == np.uint16 else 8)


def test_rgb_rgba_and_jpeg_become_grayscale():
    grey = ramp(hi=255, dtype=np.uint8)
    rgb = np.stack([grey] * 3, -1)
    rgba = np.concatenate([rgb, np.full(grey.shape + (1,), 255, np.uint8)], -1)
    for arr in (rgb, rgba):
        img = read_image(png_bytes(arr))
        assert img.pixels.ndim == 2 and np.abs(img.pixels - grey).max() <= 1
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="JPEG", quality=95)
    img = read_image(buf.getvalue())
    assert img.meta["format"] == "jpeg" and img.pixels.ndim == 2
    assert np.corrcoef(img.pixels.ravel(), grey.ravel())[0, 1] > 0.99


def _bad_inputs():
    good_dicom = make_dicom(ramp(), BitsStored=12)
    good_png = png_bytes(ramp(hi=255, dtype=np.uint8))
    yield "garbage", b"\x00\x01garbage" * 100, "not a"
    yield "empty", b"", "empty"
    yield "text", b"patient list\nnothing to see\n" * 20, "not a"
    yield "truncated dicom", good_dicom[: len(good_dicom) // 2], "decode"
    yield "truncated png", good_png[: len(good_png) // 2], "truncated"
    yield "constant", png_bytes(np.full((64, 64), 7, np.uint8)), "constant"
    yield "tiny", png_bytes(ramp(8, 8, 255, np.uint8)), "minimum"
    yield "multiframe", make_dicom(np.stack([ramp(), ramp()]), BitsStored=12, NumberOfFrames=2), "multi-frame"
    rgb = make_dicom(
        np.zeros((64, 64, 3), np.uint8), SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0
    )
    yield "colour dicom", rgb, "colour"


@pytest.mark.parametrize("name,data,needle", list(_bad_inputs()), ids=[b[0] for b in _bad_inputs()])
def test_refusals_have_one_type_and_a_clear_message(name, data, needle):
    with pytest.raises(ImageReadError, match=needle):
        read_image(data)


def test_decompression_bomb_refused_before_decoding():
    # A 20000x20000 PNG compresses to ~ 400 kB but would need 400 MB to decode.
    im = PILImage.new("L", (20000, 20000))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    with pytest.raises(ImageReadError, match="exceed.* limit"):
        read_image(buf.getvalue(), ReadLimits(max_pixels=50_000_000))
    big = make_dicom(ramp(), BitsStored=12)
    ds = pydicom.dcmread(io.BytesIO(big))
    ds.Rows = ds.Columns = 30000  # header claims more than the limit
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(ImageReadError, match="exceed.* limit"):
        read_image(buf.getvalue())


def test_a_decoder_panic_on_corrupt_rle_is_a_refusal():
    data = rle_with_one_flipped_bit()
    with pytest.raises(BaseException) as crash:
        _ = pydicom.dcmread(io.BytesIO(data)).pixel_array
    # the premise: pylibjpeg-rle's Rust decoder panics, and pyo3's PanicException is no Exception
    assert type(crash.value).__name__ == "PanicException" and not isinstance(crash.value, Exception)
    with pytest.raises(ImageReadError, match="cannot decode DICOM pixel data \\(RLE Lossless\\)"):
        read_image(data)


def test_an_interrupt_while_decoding_is_not_turned_into_a_refusal(monkeypatch):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Dataset, "pixel_array", property(interrupted))
    with pytest.raises(KeyboardInterrupt):
        read_image(make_dicom(ramp(), BitsStored=12))


def test_size_limit_on_bytes(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(png_bytes(ramp(hi=255, dtype=np.uint8)))
    with pytest.raises(ImageReadError, match="byte limit"):
        read_image(p, ReadLimits(max_bytes=100))
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.dcm")


@pytest.mark.parametrize(
    "value,years",
    [
        ("045Y", 45),
        ("006M", 0.5),
        ("010D", 10 / 365.25),
        ("003W", 3 / 52.18),
        (" 58 ", 58),  # a source table's plain number of years
        ("45 y", 45),
        ("414", None),  # implausible: a data-entry error
        ("999Y", None),
        ("", None),
        (None, None),
        ("unknown", None),
    ],
)
def test_one_age_parser_for_dicom_headers_and_source_tables(value, years):
    assert age_years(value) == (None if years is None else pytest.approx(years))
