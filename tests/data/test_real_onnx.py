"""The ONNX runtime answers real films (../shared/data: Kermany JPEGs, read and preprocessed by the model's own
reader) as torch does: probabilities within 1e-4 and the same out-of-distribution scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxr.imaging import read_image
from cxr.models.onnx_export import TOLERANCE, export
from cxr.models.onnx_runtime import OnnxPredictor
from cxr.models.predictor import Predictor
from cxr.preprocess import PreprocessSpec, preprocess
from support.varied_model import predictor_with_ood, simple_cnn, varied

pytestmark = pytest.mark.realdata
SIZE = 64
FILMS = 12  # per class


@pytest.fixture(scope="module")
def films(shared_data: Path) -> np.ndarray:
    root = shared_data / "kermany224" / "chest_xray" / "train"
    if not root.is_dir():
        pytest.skip(f"no Kermany films at {root}")
    paths = [p for label in ("NORMAL", "PNEUMONIA") for p in sorted((root / label).glob("*.jpeg"))[:FILMS]]
    return np.stack([preprocess(read_image(p), PreprocessSpec(size=SIZE)) for p in paths])


def test_real_films_get_the_same_answers_from_both_runtimes(films, tmp_path):
    fit, scored = films[::2], films[1::2]
    path = predictor_with_ood(varied(simple_cnn(), fit), SIZE, fit).save(tmp_path / "model")
    export(path)
    a, b = Predictor.from_dir(path).score(scored), OnnxPredictor.from_dir(path).score(scored)
    assert np.max(np.abs(a.probs - b.probs)) <= TOLERANCE
    np.testing.assert_allclose(b.ood, a.ood, rtol=1e-4)
