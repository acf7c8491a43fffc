"""The reader: correct DICOM grey-scale handling, rasters, refusals and no PHI."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image as PILImage
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from cxr.data.sources.synthetic import render
from cxr.errors import UserError
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


def save(ds: Dataset, **kwargs) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, **kwargs)
    return buf.getvalue()


def frame_of(data: bytes) -> bytes:
    """The one encapsulated frame of a compressed DICOM."""
    return next(generate_frames(pydicom.dcmread(io.BytesIO(data)).PixelData, number_of_frames=1))


def with_frame(data: bytes, stream: bytes, syntax: str | None = None, **attrs) -> bytes:
    """The DICOM ``data`` with its pixel data replaced by the encapsulated ``stream`` (and header attributes)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = syntax or ds.file_meta.TransferSyntaxUID
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    for k, v in attrs.items():
        setattr(ds, k, v)
    return save(ds)


def film8(size: int = 256) -> np.ndarray:
    return (render(np.random.default_rng(3), 1, 0.6, size) * 255).astype(np.uint8)


def jpeg_dicom(pixels: np.ndarray) -> bytes:
    """An 8-bit grey image as a JPEG Baseline DICOM (PIL's encoder; nothing here pins its bytes)."""
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return with_frame(make_dicom(pixels), buf.getvalue(), JPEGBaseline8Bit)


def j2k_dicom(pixels: np.ndarray) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(make_dicom(pixels, BitsStored=12)))
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    return save(ds)


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


# --- what a CR archive holds: 12-bit JPEG Extended, files without file meta -----------------------------------


def test_12bit_jpeg_extended_that_pylibjpeg_rejects_decodes_like_its_fixed_twin():
    # NEMA's NM1_JPLY: a process 2 & 4 stream pylibjpeg-libjpeg refuses ("misplaced marker"); pydicom ships a
    # re-encoded copy (JPGExtended.dcm) that it decodes: the two must agree to within the IDCT's rounding.
    lossy = read_image(get_testdata_file("JPEG-lossy.dcm"))
    fixed = read_image(get_testdata_file("JPGExtended.dcm"))
    assert lossy.meta["bits"] == 12 and lossy.meta["transfer_syntax"] == "JPEG Extended (Process 2 and 4)"
    assert lossy.pixels.shape == fixed.pixels.shape == (1024, 256)
    assert 0 <= lossy.pixels.min() and lossy.pixels.max() <= 4095
    assert np.abs(lossy.pixels - fixed.pixels).max() <= 1
    assert lossy.meta["range"] == (0.0, 4095.0)


def headerless(ds: Dataset, implicit: bool) -> bytes:
    """An ACR-NEMA style file: the data set's elements only, no preamble, no file meta, no Transfer Syntax UID."""
    return save(ds, implicit_vr=implicit, little_endian=True, enforce_file_format=False)


def chest_cr(pixels: np.ndarray) -> Dataset:
    ds = pydicom.dcmread(io.BytesIO(make_dicom(pixels, BitsStored=12, Modality="CR", BodyPartExamined="CHEST")))
    del ds.file_meta
    ds.preamble = None
    return ds


@pytest.mark.parametrize("implicit,syntax", [(True, "Implicit VR Little Endian"), (False, "Explicit VR Little Endian")])
def test_a_chest_cr_without_file_meta_is_read_in_the_encoding_it_was_written_in(implicit, syntax):
    px = ramp()
    data = headerless(chest_cr(px), implicit)
    assert data[:2] == b"\x08\x00" and b"DICM" not in data[:200]  # the premise: no preamble, no file meta
    img = read_image(data)
    assert np.array_equal(img.pixels, px.astype(np.float32))
    assert img.meta["transfer_syntax"] == syntax and img.meta["body_part"] == "CHEST"


# --- junk is refused before pydicom walks it ----------------------------------------------------------------

MB64 = 64 * 1024 * 1024


def test_64_mb_of_zeros_is_refused_without_a_forced_parse(monkeypatch):
    def no_parse(*args, **kwargs):
        raise AssertionError("a file of zeros reached pydicom's parser")

    monkeypatch.setattr(pydicom.filereader, "read_partial", no_parse)
    for junk in (bytes(MB64), bytes(128) + b"DICM" + bytes(MB64)):
        with pytest.raises(ImageReadError, match="not a DICOM, PNG or JPEG file"):
            read_image(junk)


def test_zeros_after_a_plausible_first_tag_stop_the_parse_early():
    # (0008,0005) SpecificCharacterSet, then 64 MB that pydicom would read as 8 million empty elements (~15 s)
    junk = b"\x08\x00\x05\x00\x0a\x00\x00\x00ISO_IR 100" + bytes(MB64)
    started = time.monotonic()
    with pytest.raises(ImageReadError, match="not a DICOM, PNG or JPEG file"):
        read_image(junk)
    assert time.monotonic() - started < 5  # generous: it takes ~0.1 s


def test_a_dicom_followed_by_zero_padding_still_decodes():
    px = ramp()
    img = read_image(make_dicom(px, BitsStored=12) + bytes(4096))
    assert np.array_equal(img.pixels, px.astype(np.float32))


# --- the header decides before any pixel is decoded ---------------------------------------------------------


class Refused(UserError):
    pass


def no_decoding(monkeypatch) -> None:
    def decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Dataset, "pixel_array", property(decode))


def test_header_check_sees_the_header_and_refuses_before_decoding(monkeypatch):
    seen = []

    def refuse_hands(header):
        seen.append(header)
        if header.get("body_part") == "HAND":
            raise Refused("not a chest")

    no_decoding(monkeypatch)
    with pytest.raises(Refused):  # the caller's own UserError, not turned into an ImageReadError
        read_image(make_dicom(ramp(), BitsStored=12, BodyPartExamined="HAND"), header_check=refuse_hands)
    assert seen[0]["modality"] == "DX" and seen[0]["view"] == "PA" and (seen[0]["rows"], seen[0]["cols"]) == (64, 64)
    read_image(png_bytes(ramp(hi=255, dtype=np.uint8)), header_check=refuse_hands)  # a raster's header too
    assert seen[-1] == {"format": "png", "rows": 64, "cols": 64}


def test_a_jpeg2000_larger_than_its_header_says_is_refused_before_decoding(monkeypatch):
    data = j2k_dicom(ramp(96, 80))
    assert read_image(data).pixels.shape == (96, 80)
    lying = with_frame(data, frame_of(data), Rows=32, Columns=32)
    no_decoding(monkeypatch)
    with pytest.raises(ImageReadError, match="JPEG 2000 stream is 80x96 pixels, the header says 32x32"):
        read_image(lying)


def test_a_jpeg_larger_than_its_header_says_is_refused_before_decoding(monkeypatch):
    data = jpeg_dicom(film8(128))
    lying = with_frame(data, frame_of(data), Rows=64, Columns=64)
    no_decoding(monkeypatch)
    with pytest.raises(ImageReadError, match="JPEG stream is 128x128 pixels, the header says 64x64"):
        read_image(lying)


@pytest.mark.parametrize("encode", [jpeg_dicom, j2k_dicom], ids=["jpeg-baseline", "jpeg2000"])
def test_an_encapsulated_stream_cut_to_a_quarter_is_refused(encode):
    px = film8() if encode is jpeg_dicom else film8().astype(np.uint16) * 16
    data = encode(px)
    whole = read_image(data)
    assert np.corrcoef(whole.pixels.ravel(), px.ravel())[0, 1] > 0.99
    stream = frame_of(data)
    with pytest.raises(ImageReadError, match="truncated or corrupt DICOM pixel data .*no end marker"):
        read_image(with_frame(data, stream[: len(stream) // 4]))
    # fragments are padded to an even length: padding after the end marker is no truncation
    assert np.array_equal(read_image(with_frame(data, stream + b"\x00")).pixels, whole.pixels)


# --- messages: one line, no free-text header value ----------------------------------------------------------


def test_refusals_repeat_no_free_text_header_value():
    with pytest.raises(ImageReadError, match="an unrecognised PhotometricInterpretation") as caught:
        read_image(make_dicom(ramp(), BitsStored=12, PhotometricInterpretation="MRN12345"))
    assert "MRN12345" not in str(caught.value)
    data = make_dicom(ramp(), BitsStored=12)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.12345"  # no transfer syntax anyone knows
    with pytest.raises(ImageReadError, match="unrecognised") as caught:
        read_image(save(ds))
    assert "12345" not in str(caught.value)


def broken_12bit_jpeg() -> bytes:
    """JPEG-lossy.dcm with its scan naming a component the frame does not have: every decoder gives up."""
    data = Path(get_testdata_file("JPEG-lossy.dcm")).read_bytes()
    stream = bytearray(frame_of(data))
    sos = stream.index(b"\xff\xda")
    stream[sos + 5] = 0x7F  # FFDA, length (2), component count (1), then the first component's id
    return with_frame(data, bytes(stream))


def test_a_refused_12bit_jpeg_is_one_line_and_logs_no_traceback(caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ImageReadError, match="cannot decode DICOM pixel data \\(JPEG Extended") as caught:
        read_image(broken_12bit_jpeg())
    assert "\n" not in str(caught.value)
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
