"""The model card takes its preprocessing from the prepared arrays, and a config that disagrees is refused."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from support.cli import cxr_here

TINY = [
    "data.synthetic.n_patients=16",
    "data.synthetic.size=64",
    "prepare.sizes=[32]",
    "model.image_size=32",
    "model.width=8",
    "train.epochs=1",
    "prepare.workers=1",
    "prepare.clip_percentiles=[1.0, 99.0]",
    "mlflow.enabled=false",
]


def cxr(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return cxr_here(workdir, *args, overrides=TINY, check=False)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("prepared")
    for step in ("ingest", "prepare"):
        assert cxr(work, step).returncode == 0
    return work


def test_training_with_another_resize_than_prepared_is_refused_naming_both(prepared: Path):
    res = cxr(prepared, "train", "-s", "prepare.resize=pad")
    assert res.returncode == 2, res.stderr
    message = res.stderr.strip()
    assert "prepare.resize='pad'" in message and "'squash'" in message and "Traceback" not in message
    assert not (prepared / "models" / "cxr" / "model.json").exists()  # nothing half-written


def test_the_model_card_copies_the_prepared_preprocessing_and_read_limits(prepared: Path):
    assert cxr(prepared, "train", "-s", "imaging.min_side=20").returncode == 2  # read limits differ: stage reruns
    assert cxr(prepared, "train").returncode == 0
    card = json.loads((prepared / "models" / "cxr" / "model.json").read_text())
    made = json.loads((prepared / "data" / "prepared" / "card.json").read_text())
    assert card["format"] == "cxr-model/2"
    assert card["preprocess"] == {"size": 32, "resize": "squash", "clip_percentiles": [1.0, 99.0], "version": 1}
    assert card["read_limits"] == made["read_limits"]
