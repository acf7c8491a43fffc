"""The service's Prometheus metrics: bounded reasons for refusals and warnings, input kinds, the drift signal,
the training intensities the model card carries, and what one answer adds to each metric."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from prometheus_client import CollectorRegistry

from cxr.data.sources.synthetic import render
from cxr.imaging import ImageReadError, ReadLimits, read_image
from cxr.models.card import IntensityStats, ModelCard, Moments
from cxr.preprocess import PreprocessSpec, preprocess
from cxr.serving.input_checks import NotAChestError, image_stats, input_warnings, refuse_non_chest
from cxr.serving.monitoring import (
    OTHER,
    Z_BUCKETS,
    Monitor,
    drift_z,
    input_kind,
    predicted_labels,
    refusal_reason,
    warning_reasons,
)
from cxr.serving.served import ServedModel
from cxr.tracking.uris import ModelRef
from cxr.training.card import intensity_stats
from support.films import chest_dicom, png


def dicom(seed: int = 0, size: int = 64, monochrome1: bool = False, **header) -> bytes:
    return chest_dicom(seed, size, monochrome1=monochrome1, **header)


def multiframe() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(dicom(1)))
    arr = ds.pixel_array
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack([arr, arr]).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def film(seed: int = 0, size: int = 32) -> np.ndarray:
    return preprocess(render(np.random.default_rng(seed), 0, 0.6, 128), PreprocessSpec(size=size))


def read_message(data: bytes, limits: ReadLimits | None = None) -> str:
    with pytest.raises(ImageReadError) as caught:
        read_image(data, limits)
    return str(caught.value)


# The reader's own messages (each one raised for real), and the service's.
REFUSALS = [
    ("garbage", lambda: read_message(np.random.default_rng(0).bytes(5000)), "not_an_image"),
    ("empty", lambda: read_message(b""), "empty"),
    ("constant", lambda: read_message(png(np.full((32, 32), 7, np.uint8))), "empty"),
    ("truncated", lambda: read_message(dicom(2)[:3000]), "corrupt"),
    (
        "too many pixels",
        lambda: read_message(png(np.zeros((64, 64), np.uint8)), ReadLimits(max_pixels=100)),
        "too_large",
    ),
    ("too many bytes", lambda: read_message(dicom(3), ReadLimits(max_bytes=1000)), "too_large"),
    ("too small", lambda: read_message(png(np.zeros((8, 8), np.uint8))), "too_small"),
    ("multi-frame", lambda: read_message(multiframe()), "unsupported"),
    ("text", lambda: read_message(b"patient list\n" * 50), "not_an_image"),
    ("upload limit", lambda: "request body of 9 bytes exceeds the upload limit of 5 bytes (imaging...)", "too_large"),
    ("too many files", lambda: "65 files in one request; the limit is 64", "too_many_files"),
    (
        "internal",
        lambda: "upload: could not process this image (KeyError); if it is a valid radiograph...",
        "internal_error",
    ),
]


@pytest.mark.parametrize("name,message,reason", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_are_classified_into_a_fixed_reason(name, message, reason):
    assert refusal_reason(message()) == reason


def test_a_non_chest_refusal_and_an_unknown_message():
    with pytest.raises(NotAChestError) as caught:
        refuse_non_chest({"body_part": "HAND"})
    assert refusal_reason(str(caught.value)) == "not_chest"
    assert refusal_reason("something nobody wrote yet 0.1234") == OTHER


def test_warnings_are_classified_and_one_warning_can_name_several_statistics():
    frontal = film()
    assert input_warnings({"format": "dicom", "view": "PA"}, frontal) == []
    (lateral,) = input_warnings({"format": "dicom", "view": "LL"}, frontal)
    (missing,) = input_warnings({"format": "dicom"}, frontal)
    assert warning_reasons(lateral) == ["non_frontal_view"] and warning_reasons(missing) == ["view_missing"]
    (inverted,) = input_warnings({"format": "png"}, 255 - frontal)
    assert "centre_not_brighter" in warning_reasons(inverted)
    (dark,) = input_warnings({"format": "png"}, np.zeros((32, 32), np.uint8))
    assert set(warning_reasons(dark)) == {"unusual_brightness", "unusual_contrast", "centre_not_brighter"}
    assert warning_reasons("a warning nobody wrote yet") == [OTHER]


def test_input_kind_names_the_format_view_and_grey_scale_and_nothing_else():
    m1 = read_image(dicom(4, monochrome1=True, ViewPosition="AP")).meta
    assert input_kind(m1) == {"format": "dicom", "view": "AP", "photometric": "MONOCHROME1"}
    lateral = read_image(dicom(5, ViewPosition="LL")).meta
    assert input_kind(lateral) == {"format": "dicom", "view": "LATERAL", "photometric": "MONOCHROME2"}
    assert input_kind({"format": "dicom", "view": None, "photometric": "MONOCHROME2"})["view"] == "MISSING"
    assert input_kind({"format": "dicom", "view": "oblique", "photometric": "PALETTE COLOR"}) == {
        "format": "dicom",
        "view": "OTHER",
        "photometric": "OTHER",
    }
    assert input_kind(read_image(png(film())).meta) == {"format": "png", "view": "N/A", "photometric": "N/A"}


def test_drift_is_distance_from_the_training_images_in_their_standard_deviations():
    reference = IntensityStats(images=10, mean=Moments(average=0.5, spread=0.1), std=Moments(average=0.2, spread=0.0))
    z = drift_z({"mean": 0.7, "std": 0.2005}, reference)
    assert z["mean"] == pytest.approx(2.0)
    assert z["std"] == pytest.approx(0.5)  # a zero spread is floored (MIN_SPREAD), never a division by zero


def test_training_intensities_summarise_each_images_mean_and_std():
    images = np.stack([film(seed) for seed in range(7)])
    index = np.array([5, 0, 3, 2])
    stats = intensity_stats(images, index, chunk=3)
    per_image = [image_stats(images[i]) for i in index]
    means, stds = np.array([s["mean"] for s in per_image]), np.array([s["std"] for s in per_image])
    assert stats.images == 4
    assert stats.mean.average == pytest.approx(means.mean(), abs=1e-6)
    assert stats.mean.spread == pytest.approx(means.std(), abs=1e-6)
    assert stats.std.average == pytest.approx(stds.mean(), abs=1e-6)
    assert stats.std.spread == pytest.approx(stds.std(), abs=1e-6)
    assert intensity_stats(images, np.array([], int)) is None


def test_a_card_with_training_intensities_round_trips_and_an_old_one_loads_without(tiny_predictor):
    card = tiny_predictor().card
    assert card.train_intensity is None and "train_intensity" not in card.to_dict()
    stats = IntensityStats(images=3, mean=Moments(average=0.5, spread=0.1), std=Moments(average=0.2, spread=0.05))
    with_stats = card.model_copy(update={"train_intensity": stats})
    assert ModelCard.from_json(with_stats.to_json()).train_intensity == stats


def test_predicted_labels():
    assert predicted_labels("pneumonia") == ["pneumonia"]
    assert predicted_labels(["a", "b"]) == ["a", "b"] and predicted_labels([]) == ["none"]


def test_one_answer_moves_each_metric_by_the_right_amount(tiny_predictor):
    predictor = tiny_predictor()
    reference = IntensityStats(images=9, mean=Moments(average=0.5, spread=0.1), std=Moments(average=0.2, spread=0.05))
    predictor.card = predictor.card.model_copy(update={"train_intensity": reference})
    served = ServedModel(predictor, ModelRef("cxr", "7", "models:/cxr@champion"))
    registry = CollectorRegistry()
    monitor = Monitor(registry)
    prepared = served.prepare(dicom(6, monochrome1=True, ViewPosition="LL"))
    (answer,) = served.predict([dicom(6, monochrome1=True, ViewPosition="LL")])
    monitor.answered(served, prepared, answer)
    monitor.refused("upload: empty file")

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    p = answer["probabilities"]["pneumonia"]
    assert (
        value("cxr_predictions_total", prediction=answer["prediction"], model_version="7", operating_point="model") == 1
    )
    assert value("cxr_score_count", label="pneumonia", model_version="7") == 1
    assert value("cxr_score_sum", label="pneumonia", model_version="7") == pytest.approx(p)
    assert value("cxr_score_count", label="normal", model_version="7") is None  # binary: the positive class only
    assert value("cxr_input_warnings_total", reason="non_frontal_view") == 1
    assert value("cxr_refusals_total", reason="empty") == 1
    assert value("cxr_inputs_total", format="dicom", view="LATERAL", photometric="MONOCHROME1") == 1
    stats = image_stats(prepared.x)
    assert value("cxr_input_intensity_sum", stat="mean") == pytest.approx(stats["mean"])
    z = (stats["std"] - 0.2) / 0.05  # signed, so no _sum (prometheus_client drops it): the buckets say where
    assert value("cxr_input_drift_zscore_count", stat="std") == 1
    for bound in Z_BUCKETS:
        assert value("cxr_input_drift_zscore_bucket", stat="std", le=str(bound)) == (z <= bound)


def test_a_metric_that_cannot_be_written_costs_the_metric_not_the_answer(monkeypatch):
    monitor = Monitor(CollectorRegistry())

    def broken(*args):
        raise OSError("multiprocess directory removed")

    monkeypatch.setattr(monitor.refusals, "labels", broken)
    monitor.refused("upload: empty file")  # no exception
