"""``model.arch: random_forest`` through fit's tail, the Predictor and the served model, on tiny synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from cxr.config import Config
from cxr.data.ingest import ingest
from cxr.data.loader import PreparedData
from cxr.data.prepare import prepare
from cxr.models.predictor import Predictor
from cxr.serving.served import ServedModel
from cxr.training.baseline import pixel_features, random_forest
from cxr.training.fit import fit
from support.films import chest_dicom
from support.tiny import TINY_STUDY

pytestmark = pytest.mark.slow


def test_random_forest_is_trained_saved_and_served_like_a_network(tmp_path):
    paths = [f"paths.{name}={tmp_path / name}" for name in ("raw", "prepared", "model", "reports")]
    forest = ["model.arch=random_forest", "model.forest.n_estimators=25", "model.forest.min_samples_leaf=2"]
    cfg = Config().override([*TINY_STUDY, *paths, *forest, "mlflow.enabled=false"])
    ingest(cfg)
    prepare(cfg)
    result = fit(cfg)

    predictor = Predictor.from_dir(cfg.paths.model)
    card = predictor.card
    assert card.arch == "random_forest" and card.architecture["n_trees"] == 25
    assert card.ood is None and card.threshold == result.threshold and 0 < card.threshold < 1
    # the saved twin answers as the forest the config describes, refitted here with the same seed
    data = PreparedData(cfg.paths.prepared, cfg.model.image_size)
    val = data.images[data.split("val")]
    refit = random_forest(cfg, data, pixel_features(data.images[data.split("train")]))
    want = refit.predict_proba(pixel_features(val))[:, 1]
    assert np.abs(predictor.predict_proba(val) - want).max() <= 1e-6

    served = ServedModel.load(Config(), uri=cfg.paths.model)
    uploads = [chest_dicom(seed, 96, label=seed % 2) for seed in range(3)]
    answers = served.predict(uploads)
    expected = predictor.predict_files(uploads)
    for got, exp in zip(answers, expected):
        assert got["probabilities"] == pytest.approx(exp["probabilities"], abs=1e-6)
        assert got["ood"] == {"checked": False} and got["threshold"] == pytest.approx(card.threshold)
