"""The serving engine without HTTP: which model is served, and uploads in, answers out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cxr.config import Config
from cxr.data.sources.synthetic import render
from cxr.errors import UserError
from cxr.preprocess import PreprocessSpec, preprocess
from cxr.serving.explain import EMPTY_GRADCAM
from cxr.serving.served import NoModelToServe, ServedModel
from cxr.tracking.uris import ModelUriError, load_predictor, local_model_dir, resolve
from support.films import chest_dicom, png


def dicom(seed: int = 0, **header) -> bytes:
    return chest_dicom(seed, 96, label=seed % 2, identifying=True, **header)


@pytest.fixture
def served(tmp_path, monkeypatch, tiny_predictor) -> ServedModel:
    tiny_predictor(32).save(tmp_path / "model")
    monkeypatch.setenv("CXR_MODEL_URI", str(tmp_path / "model"))
    monkeypatch.chdir(tmp_path)
    return ServedModel.load(Config())


def test_a_model_directory_is_served_as_is(served, tmp_path):
    assert served.ref.to_dict() == {"name": "model", "version": None, "uri": str((tmp_path / "model").resolve())}
    meta = served.metadata()
    assert meta["labels"] == ["normal", "pneumonia"] and meta["preprocess"]["size"] == 32
    assert meta["training"]["dataset_hash"] == "test"


def test_predict_matches_the_predictor_and_refuses_per_upload(served):
    good = [dicom(0), dicom(1, ViewPosition="LL"), png(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1)))]
    uploads = [
        good[0],
        b"not an image",
        good[1],
        dicom(2, BodyPartExamined="HAND"),
        good[2],
        b"",
        dicom(4, ViewPosition=""),
    ]
    results = served.predict(uploads)
    expected = served.predictor.predict_files(good)
    for got, want in zip([results[0], results[2], results[4]], expected):
        assert set(got) == {"probabilities", "prediction", "positive", "threshold", "ood", "model", "warnings"}
        assert got["ood"] == {"checked": False}  # the tiny model has no out-of-distribution check
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)
        assert got["model"] == served.ref.to_dict()
    assert results[0]["warnings"] == []
    assert any("non-frontal" in w for w in results[2]["warnings"])
    assert not any("view" in w for w in results[4]["warnings"])  # a PNG cannot say its view: nothing to warn
    assert any("view unknown" in w for w in results[6]["warnings"])  # a DICOM could have, and did not
    assert results[1] == {"error": "upload: not a DICOM, PNG or JPEG file", "status": 422}
    assert "BodyPartExamined=HAND" in results[3]["error"] and results[3]["status"] == 422
    assert "empty" in results[5]["error"]
    text = repr(results)
    assert "Doe" not in text and "998877" not in text


def test_explain_answer(served):
    with torch.no_grad():  # every feature channel raises the score: the Grad-CAM has heat
        served.predictor.model.head.weight.abs_()
    out = served.explain(dicom(3))
    assert out["png"][:8] == b"\x89PNG\r\n\x1a\n" and out["label"] == "pneumonia"
    assert out["warnings"] == [] and out["model"] == served.ref.to_dict()
    assert 0.0 < out["lung_share"] <= 1.0
    # the same film as a PNG: no view warning, and the lung share is computed the same way
    same_film = png(preprocess(render(np.random.default_rng(3), 1, 0.6, 96), PreprocessSpec(size=96)))
    as_png = served.explain(same_film)
    assert as_png["warnings"] == [] and as_png["lung_share"] == pytest.approx(out["lung_share"], abs=0.01)
    assert served.explain(b"garbage")["status"] == 422


def test_explain_says_when_the_gradcam_is_empty(served):
    with torch.no_grad():  # the score ignores the image
        served.predictor.model.head.weight.zero_()
    out = served.explain(dicom(3))
    assert out["lung_share"] is None and out["warnings"] == [EMPTY_GRADCAM]  # never a share of 0
    assert out["lung_area"] is not None and out["png"][:8] == b"\x89PNG\r\n\x1a\n"


def test_no_champion_is_one_clear_error_and_creates_no_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CXR_MODEL_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(NoModelToServe, match="no MLflow store at sqlite:///mlflow.db.*cxr promote") as err:
        ServedModel.load(Config())
    assert f"i.e. {tmp_path.resolve() / 'mlflow.db'}; use an absolute path" in str(err.value)
    assert not (tmp_path / "mlflow.db").exists()
    monkeypatch.setenv("CXR_MODEL_URI", "no/such/dir")
    with pytest.raises(NoModelToServe, match="neither a model directory nor an MLflow URI.*CXR_MODEL_URI"):
        ServedModel.load(Config())
    assert not (tmp_path / "mlflow.db").exists()


def test_one_resolver_for_every_kind_of_model_location(tmp_path, monkeypatch, tiny_predictor):
    """A directory is itself; a registry alias needs the store; anything else says what a location may be."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tiny = tiny_predictor(32)
    model = tiny.save(tmp_path / "model")
    ref, load_uri = resolve(Config(), str(model))
    assert (ref.name, ref.version, load_uri) == ("model", None, str(model.resolve()))
    assert local_model_dir(model) == model
    assert load_predictor(model).card == tiny.card  # saving recorded the weights' hash on it
    for bad in ("no/such/dir", tmp_path / "missing"):
        with pytest.raises(ModelUriError, match="neither a model directory nor an MLflow URI"):
            resolve(Config(), bad)
        with pytest.raises(ModelUriError, match="neither a model directory nor an MLflow URI"):
            load_predictor(bad)
    with pytest.raises(ModelUriError, match="no MLflow store at sqlite:///mlflow.db"):
        resolve(Config(), "models:/cxr@champion")


def test_the_weightless_copy_says_what_the_model_says(served):
    """The entry service rebuilds the served model from the model service's card (plain JSON)."""
    card = served.card()
    copy = ServedModel.without_weights(json.loads(json.dumps(card)))
    assert copy.metadata() == served.metadata()
    assert copy.predictor.card == served.predictor.card
    assert copy.prepare(dicom(0)).x.tolist() == served.prepare(dicom(0)).x.tolist()
    with pytest.raises(RuntimeError, match="no weights"):
        copy.infer([(served.prepare(dicom(0)).x, None)])


def test_bf16_serving_stays_close_to_fp32_and_says_so(tmp_path, monkeypatch, tiny_predictor):
    """CXR_PRECISION=bf16 runs the forward pass in bfloat16: other numbers than fp32, but close, and declared."""
    tiny_predictor(32, seed=1).save(tmp_path / "model")
    monkeypatch.setenv("CXR_MODEL_URI", str(tmp_path / "model"))
    monkeypatch.chdir(tmp_path)
    fp32, bf16 = (ServedModel.load(Config(), precision=p) for p in ("fp32", "bf16"))
    uploads = [dicom(i) for i in range(4)]
    a = [r["probabilities"]["pneumonia"] for r in fp32.predict(uploads)]
    b = [r["probabilities"]["pneumonia"] for r in bf16.predict(uploads)]
    assert a != b  # the autocast really ran
    assert b == pytest.approx(a, abs=0.03)
    assert (fp32.metadata()["precision"], bf16.metadata()["precision"]) == ("fp32", "bf16")
    # the entry service rebuilds the model from the model service's card: it must say the same
    assert ServedModel.without_weights(bf16.card()).metadata()["precision"] == "bf16"
    with pytest.raises(UserError, match="unknown precision 'fp16'; use one of fp32, bf16"):
        ServedModel.load(Config(), precision="fp16")
