"""Fuzzing the reader: thousands of truncated, bit-flipped and lying files, each decoded sanely or refused.

Seeds: pydicom's bundled test files (RLE, JPEG, 12-bit JPEG through GDCM, JPEG 2000, JPEG-LS, deflate, big endian, 1/8/16-bit), the
synthetic generator's DICOMs (MONOCHROME1, 8-bit, windowed, JPEG 2000, RLE) and PNG/JPEG files (an RGBA
PNG among them). tests/data/test_real_fuzz.py does the same with ../shared/data's files. The loop, its
mutations and its memory cap live in tests/support/reader_fuzz.py; the counts are printed (see them with
-s) and recorded as the `reader_fuzz` property (in --junitxml reports).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from pydicom.data import get_testdata_file
from pydicom.uid import RLELossless

from cxr.data.sources.synthetic import Encoding, encode, make_dataset, render
from support.reader_fuzz import fuzz_seeds

# Bundled with pydicom (never downloaded): grey-scale single frames of every codec, and one colour RLE.
BUNDLED = [
    "MR_small_RLE.dcm",  # RLE, 16-bit
    "MR_small.dcm",  # explicit VR little endian, 16-bit signed
    "MR_small_bigendian.dcm",
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "JPEG2000.dcm",  # JPEG 2000, 1024 x 256
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS
    "JPGExtended.dcm",  # JPEG extended (12-bit), 1024 x 256
    "JPEG-lossy.dcm",  # the same image as NEMA stored it: 12-bit JPEG that only GDCM decodes
    "image_dfl.dcm",  # deflated, 8-bit
    "liver_1frame.dcm",  # 1-bit
    "SC_rgb_rle.dcm",  # colour RLE: refused, but its mutants go through the header checks
]


def bundled_seeds() -> list[tuple[str, bytes]]:
    return [(name, Path(get_testdata_file(name)).read_bytes()) for name in BUNDLED]


def synthetic_seeds() -> list[tuple[str, bytes]]:
    encodings = {
        "syn_12bit_rescaled_windowed.dcm": Encoding(rescale=(1.0, -1024.0), window=True),
        "syn_8bit.dcm": Encoding(bits=8),
        "syn_monochrome1_windowed.dcm": Encoding(monochrome1=True, window=True, modality="CR"),
        "syn_jpeg2000.dcm": Encoding(jpeg2000=True),
        "syn_rle_monochrome1.dcm": Encoding(monochrome1=True),
    }
    seeds = []
    for i, (name, enc) in enumerate(encodings.items()):
        rng = np.random.default_rng(i)
        ds = make_dataset(render(rng, i % 2, 0.6, 48), enc, rng)
        if name.startswith("syn_rle"):
            ds.compress(RLELossless, generate_instance_uid=False)
        seeds.append((name, encode(ds)))
    return seeds


def raster_seeds() -> list[tuple[str, bytes]]:
    film = render(np.random.default_rng(7), 1, 0.6, 48)
    grey = (film * 255).astype(np.uint8)
    rgb = np.stack([grey] * 3, -1)
    images = {
        "grey.png": PILImage.fromarray(grey),
        "grey16.png": PILImage.fromarray((film * 65535).astype(np.uint16)),
        "rgb.png": PILImage.fromarray(rgb),
        "rgba.png": PILImage.fromarray(np.dstack([rgb, np.full_like(grey, 200)])),
        "palette.png": PILImage.fromarray(grey).convert("P"),
        "grey.jpg": PILImage.fromarray(grey),
        "rgb_progressive.jpg": PILImage.fromarray(rgb),
    }
    seeds = []
    for name, image in images.items():
        buf = io.BytesIO()
        if name.endswith(".jpg"):
            image.save(buf, format="JPEG", quality=90, progressive="progressive" in name)
        else:
            image.save(buf, format="PNG", **({"transparency": 0} if name == "palette.png" else {}))
        seeds.append((name, buf.getvalue()))
    return seeds


@pytest.mark.timeout(600)
def test_every_mutant_decodes_sanely_or_is_refused(tmp_path, record_property):
    result = fuzz_seeds(bundled_seeds() + synthetic_seeds() + raster_seeds(), tmp_path, record_property)
    assert result["mutants"] >= 2000
    # a fuzz that only ever refuses (or only decodes) tests nothing: both outcomes must be common
    assert result["decoded"] > 0.1 * result["mutants"] and result["refused"] > 0.1 * result["mutants"]
