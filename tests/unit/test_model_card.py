"""The model card (model.json): typed, versioned, validated when read, and the old layout still read."""

from __future__ import annotations

import json

import pytest

from cxr.models.card import SCHEMA, ModelCard, ModelCardError
from cxr.models.predictor import CARD_FILE, Predictor

# A model.json as cxr wrote it before the card was typed (cxr-model/1).
V1_CARD = {
    "format": "cxr-model/1",
    "architecture": {
        "arch": "simple_cnn",
        "n_outputs": 1,
        "dropout": 0.3,
        "width": 8,
        "n_tabular": 0,
        "norm_mean": 0.5,
        "norm_std": 0.25,
    },
    "preprocess": {"size": 32, "resize": "squash", "clip_percentiles": [0.5, 99.5], "version": 1},
    "read_limits": {"min_side": 16, "max_pixels": 60000000, "max_bytes": 209715200},
    "task": "binary",
    "labels": ["normal", "pneumonia"],
    "threshold": 0.47881741043791176,
    "threshold_method": "youden_kernel",
    "threshold_augmented_copies": 10,
    "training": {
        "dataset_hash": "385b3840ee8dd74ab85239451762b8f70dfc49a427382536f53e5972ffe99907",
        "source": "synthetic",
        "synthetic": True,
        "run_id": "bade7ec0d63f4c07a2ecb14f75d3b23e",
        "best_epoch": 1,
        "val_auroc": 0.7222222222222222,
        "epochs_trained": 1,
        "git_commit": "unknown",
    },
}


def test_a_card_round_trips_through_json_and_a_model_directory(tiny_predictor, tmp_path):
    predictor = tiny_predictor(32, task="multilabel", labels=("a", "b", "c"))
    card = predictor.card.model_copy(update={"threshold": [0.2, 0.5, 0.7]}).with_run(run_id="r1", members=None)
    assert card.format == SCHEMA
    assert ModelCard.from_json(card.to_json()) == card
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card
    predictor.card = card
    loaded = Predictor.from_dir(predictor.save(tmp_path / "model"))
    assert loaded.card == predictor.card == card.model_copy(update={"weights_sha256": loaded.card.weights_sha256})
    assert loaded.threshold == [0.2, 0.5, 0.7] and loaded.card.training.run_id == "r1"
    assert loaded.spec == predictor.spec and loaded.limits == predictor.limits


def test_an_unknown_format_is_refused_naming_it_and_what_to_do(tiny_predictor, tmp_path):
    model = tiny_predictor(32).save(tmp_path / "model")
    card = json.loads((model / CARD_FILE).read_text())
    (model / CARD_FILE).write_text(json.dumps({**card, "format": "cxr-model/99"}))
    with pytest.raises(ModelCardError) as err:
        Predictor.from_dir(model)
    message = str(err.value)
    assert str(model / CARD_FILE) in message and "'cxr-model/99'" in message
    assert SCHEMA in message and "cxr train" in message
    with pytest.raises(ModelCardError, match="format None"):
        ModelCard.from_dict({k: v for k, v in card.items() if k != "format"})


@pytest.mark.parametrize(
    "drop,named",
    [
        (("labels",), "labels"),
        (("read_limits",), "read_limits"),
        (("training", "dataset_hash"), "training.dataset_hash"),
    ],
)
def test_a_card_missing_a_field_is_refused_with_the_field_named(drop, named):
    data = json.loads(json.dumps(V1_CARD))
    parent = data
    for key in drop[:-1]:
        parent = parent[key]
    del parent[drop[-1]]
    with pytest.raises(ModelCardError, match=rf"not a valid model card \({named}: Field required"):
        ModelCard.from_dict(data, "model.json")


def test_a_field_of_the_wrong_kind_or_unknown_is_refused():
    with pytest.raises(ModelCardError, match="task"):
        ModelCard.from_dict({**V1_CARD, "task": "regression"})
    with pytest.raises(ModelCardError, match="colour"):
        ModelCard.from_dict({**V1_CARD, "colour": "blue"})
    with pytest.raises(ModelCardError, match="not valid JSON"):
        ModelCard.from_json("{not json")


def test_a_cxr_model_1_card_still_loads(tiny_predictor, tmp_path):
    card = ModelCard.from_dict(V1_CARD)
    assert card.format == SCHEMA and card.arch == "simple_cnn" and card.n_tabular == 0
    assert card.threshold == V1_CARD["threshold"] and card.training.run_id == V1_CARD["training"]["run_id"]
    assert card.preprocess_spec.size == 32 and card.limits.min_side == 16
    # a model directory written by that version: its weights and its v1 model.json
    model = tiny_predictor(32).save(tmp_path / "model")
    (model / CARD_FILE).write_text(json.dumps(V1_CARD))
    loaded = Predictor.from_dir(model)
    assert loaded.card == card and loaded.card.weights_sha256 is None  # a v1 card has no hash: nothing to check
    assert loaded.threshold == V1_CARD["threshold"]
