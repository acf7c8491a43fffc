"""A broken or altered model never answers: NaN weights, changed or truncated files are refused at load with
one line, and a NaN output is refused per answer instead of reading as "normal"."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cxr.config import Config
from cxr.fsutil import sha256_file
from cxr.models.predictor import CARD_FILE, WEIGHTS_FILE, BrokenModel, ModelLoadError, NonFiniteOutput, Predictor
from cxr.serving import served as served_module
from cxr.serving.served import NO_VALID_OUTPUT, NoModelToServe, ServedModel, check_registered_weights
from cxr.tracking.registry import WEIGHTS_TAG, version_tags
from cxr.tracking.uris import ModelRef
from support.films import chest_dicom


def saved(tiny_predictor, tmp_path):
    path = tmp_path / "model"
    tiny_predictor(32).save(path)
    return path


def rewrite_weights(path, change) -> None:
    state = load_file(str(path / WEIGHTS_FILE))
    change(state)
    save_file(state, str(path / WEIGHTS_FILE))


def rehash(path) -> None:
    """Make the card agree with altered weights: what someone who edits the model directory could do."""
    card = json.loads((path / CARD_FILE).read_text())
    card["weights_sha256"] = sha256_file(path / WEIGHTS_FILE)
    (path / CARD_FILE).write_text(json.dumps(card))


def first_weight(state):
    return next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)


def test_the_card_records_the_hash_of_the_weights_it_was_saved_with(tiny_predictor, tmp_path):
    path = saved(tiny_predictor, tmp_path)
    card = json.loads((path / CARD_FILE).read_text())
    assert card["weights_sha256"] == sha256_file(path / WEIGHTS_FILE)
    Predictor.from_dir(path)  # and it loads


def test_weights_that_do_not_match_the_card_are_refused(tiny_predictor, tmp_path):
    path = saved(tiny_predictor, tmp_path)
    rewrite_weights(path, lambda s: s.__setitem__(first_weight(s), -s[first_weight(s)]))  # negated: inverted answers
    with pytest.raises(ModelLoadError, match="not the file this model was saved with") as err:
        Predictor.from_dir(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3]),  # truncated copy
        lambda p: p.write_bytes(b"\x00garbage" * 1000),
    ],
    ids=["truncated", "garbage"],
)
def test_unloadable_weights_are_one_line(tiny_predictor, tmp_path, damage):
    path = saved(tiny_predictor, tmp_path)
    damage(path / WEIGHTS_FILE)
    rehash(path)  # past the hash check: the loader itself must turn the failure into one line
    with pytest.raises(ModelLoadError, match="cannot load the weights") as err:
        Predictor.from_dir(path)
    assert "\n" not in str(err.value)


def test_another_architectures_weights_are_one_line(tiny_predictor, tmp_path):
    path = saved(tiny_predictor, tmp_path)
    rewrite_weights(path, lambda s: s.pop(first_weight(s)))
    rehash(path)
    with pytest.raises(ModelLoadError, match="cannot load the weights"):
        Predictor.from_dir(path)


def test_nan_weights_are_refused_at_load(tiny_predictor, tmp_path):
    path = saved(tiny_predictor, tmp_path)
    rewrite_weights(path, lambda s: s[first_weight(s)].view(-1).__setitem__(0, float("nan")))
    rehash(path)
    with pytest.raises(ModelLoadError, match="NaN or inf on a probe image"):
        Predictor.from_dir(path)


def test_the_service_refuses_to_start_on_a_broken_model(tiny_predictor, tmp_path, monkeypatch):
    path = saved(tiny_predictor, tmp_path)
    rewrite_weights(path, lambda s: s[first_weight(s)].fill_(float("inf")))
    rehash(path)
    monkeypatch.setenv("CXR_MODEL_URI", str(path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NoModelToServe, match="NaN or inf"):
        ServedModel.load(Config())


def test_a_nan_answer_is_refused_never_a_decision(tiny_predictor, tmp_path, monkeypatch):
    """A model that breaks after load (or a NaN from one film) must not answer "normal": NaN >= t is False."""
    path = saved(tiny_predictor, tmp_path)
    monkeypatch.setenv("CXR_MODEL_URI", str(path))
    monkeypatch.chdir(tmp_path)
    served = ServedModel.load(Config())
    with pytest.raises(NonFiniteOutput):
        served.predictor.describe(float("nan"))
    with torch.no_grad():
        next(served.predictor.model.parameters()).fill_(float("nan"))
    (answer,) = served.predict([chest_dicom(0, 96)])
    assert answer["status"] == NO_VALID_OUTPUT and "NaN" in answer["error"]
    assert "prediction" not in answer


def test_a_card_from_before_hashes_still_loads(tiny_predictor, tmp_path):
    path = saved(tiny_predictor, tmp_path)
    card = json.loads((path / CARD_FILE).read_text())
    del card["weights_sha256"]
    (path / CARD_FILE).write_text(json.dumps(card))
    probs = Predictor.from_dir(path).predict_proba(np.full((1, 32, 32), 100, np.uint8))
    assert np.isfinite(probs).all()


def test_a_registered_version_serves_only_the_weights_it_was_registered_with(tiny_predictor, tmp_path, monkeypatch):
    """Someone who rewrites a version's artifacts (weights and card alike) is caught by the registry's own record."""
    card = Predictor.from_dir(saved(tiny_predictor, tmp_path)).card
    tags = version_tags("run1", card, {}, {}, None)
    assert tags[WEIGHTS_TAG] == card.weights_sha256
    registered = {WEIGHTS_TAG: card.weights_sha256}
    monkeypatch.setattr(served_module, "registry_version", lambda uri: SimpleNamespace(tags=registered))
    ref = ModelRef("cxr", "1", "models:/cxr@champion")
    check_registered_weights(ref, card)  # the same weights: served
    other = card.model_copy(update={"weights_sha256": "0" * 64})
    with pytest.raises(BrokenModel, match="was registered with weights sha256"):
        check_registered_weights(ref, other)
    registered.clear()  # a version registered before the tag existed
    check_registered_weights(ref, other)
