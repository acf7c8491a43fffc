"""Refusals and warnings the service attaches to an input."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from cxr.data.sources.synthetic import Encoding, encode, make_dataset, render
from cxr.imaging import read_image
from cxr.preprocess import PreprocessSpec, preprocess
from cxr.serving.input_checks import NotAChestError, image_stats, input_warnings, refuse_non_chest


def film(seed: int = 0, size: int = 64) -> np.ndarray:
    return preprocess(render(np.random.default_rng(seed), 0, 0.6, 128), PreprocessSpec(size=size))


@pytest.mark.parametrize(
    "meta",
    [{"body_part": "EXTREMITY"}, {"body_part": "hand"}, {"modality": "CT"}, {"body_part": "CHEST", "modality": "MR"}],
)
def test_non_chest_dicoms_are_refused(meta):
    with pytest.raises(NotAChestError, match="chest radiographs only"):
        refuse_non_chest(meta)


@pytest.mark.parametrize(
    "meta",
    [
        {},
        {"body_part": "CHEST", "modality": "DX"},
        {"body_part": None, "modality": "CR"},
        {"body_part": "thorax"},
        {"format": "png"},
    ],
)
def test_chest_or_unknown_body_part_passes(meta):
    refuse_non_chest(meta)


def test_frontal_chest_film_has_no_warnings():
    assert input_warnings({"view": "PA"}, film()) == []
    assert input_warnings({"view": "AP"}, film(1, size=224)) == []


def test_view_warnings_only_where_the_format_could_carry_a_view():
    dicom = {"format": "dicom"}
    assert any("non-frontal" in w and "LL" in w for w in input_warnings({**dicom, "view": "LL"}, film()))
    assert any("view unknown" in w for w in input_warnings({**dicom, "view": None}, film()))
    assert input_warnings({**dicom, "view": "PA"}, film()) == []
    # PNG/JPEG have no view field: a chest film in them gets no warning at all
    assert input_warnings({"format": "png"}, film()) == []
    assert input_warnings({"format": "jpeg"}, film(1, size=224)) == []


@pytest.mark.parametrize(
    "name,image",
    [
        ("inverted", 255 - film()),
        ("noise", (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)),
        ("flat", np.full((64, 64), 128, np.uint8)),
    ],
)
def test_images_far_from_chest_films_are_flagged(name, image):
    warnings = input_warnings({"view": "PA"}, image)
    assert len(warnings) == 1 and "far from the chest radiographs" in warnings[0]


def test_image_stats_of_a_film():
    s = image_stats(film())
    assert 0.25 < s["mean"] < 0.9 and 0.14 < s["std"] < 0.42 and s["mediastinum_contrast"] > 0.1
    assert image_stats(255 - film())["mediastinum_contrast"] == pytest.approx(-s["mediastinum_contrast"], abs=1e-2)


def test_messages_repeat_only_known_header_terms():
    # a free-text field can hold anything: a patient id typed into ViewPosition must not come back
    said = input_warnings({"format": "dicom", "view": "MRN12345"}, film())
    assert said[0].startswith("non-frontal view (an unrecognised ViewPosition)") and "MRN12345" not in said[0]
    with pytest.raises(NotAChestError, match="an unrecognised BodyPartExamined") as caught:
        refuse_non_chest({"body_part": "MRN12345"})
    assert "MRN12345" not in str(caught.value)
    with pytest.raises(NotAChestError, match="BodyPartExamined=HAND"):  # a defined term is worth repeating
        refuse_non_chest({"body_part": "hand"})


def test_refuse_non_chest_runs_as_the_readers_header_check_before_decoding(monkeypatch):
    rng = np.random.default_rng(0)
    ds = make_dataset(render(rng, 0, 0.6, 48), Encoding(jpeg2000=True), rng)
    ds.BodyPartExamined = "KNEE"
    data = encode(ds)

    def decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Dataset, "pixel_array", property(decode))
    with pytest.raises(NotAChestError, match="BodyPartExamined=KNEE"):
        read_image(data, header_check=refuse_non_chest)
