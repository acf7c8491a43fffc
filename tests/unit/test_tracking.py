"""Tracking configuration: each configure() call goes to its own config's store."""

from __future__ import annotations

import json
import os

import mlflow
import numpy as np
import pandas as pd

from cxr.config import Config
from cxr.data.loader import PreparedData
from cxr.tracking import runs as tracking


def _cfg(tmp_path, name):
    return Config().override(
        {
            "mlflow.tracking_uri": f"sqlite:///{tmp_path / name / 'mlflow.db'}",
            "mlflow.artifact_location": str(tmp_path / name / "artifacts"),
        }
    )


def test_second_configure_is_not_captured_by_the_first(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    tracking.configure(_cfg(tmp_path, "a"))
    # mlflow exports the URI to the environment; child processes must not inherit it as the user's choice
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    tracking.configure(_cfg(tmp_path, "b"))
    assert mlflow.get_tracking_uri().endswith("/b/mlflow.db") and mlflow.get_registry_uri().endswith("/b/mlflow.db")


def test_user_environment_wins_over_params(tmp_path, monkeypatch):
    (tmp_path / "env").mkdir()
    (tmp_path / "a").mkdir()
    env_uri = f"sqlite:///{tmp_path / 'env' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    tracking.configure(_cfg(tmp_path, "a"))
    assert mlflow.get_tracking_uri() == env_uri and os.environ["MLFLOW_TRACKING_URI"] == env_uri


def _prepared(root, manifest: pd.DataFrame, size: int = 8):
    """A minimal prepared folder: card, manifest and the image array."""
    root.mkdir(parents=True)
    card = {"source": "synthetic", "task": "binary", "classes": ["normal", "pneumonia"], "sizes": [size],
            "preprocess": {"resize": "squash", "clip_percentiles": [0.5, 99.5]}}  # fmt: skip
    (root / "card.json").write_text(json.dumps(card))
    manifest.to_csv(root / "manifest.csv", index=False)
    np.save(root / f"images_{size}.npy", np.zeros((len(manifest), size, size), np.uint8))
    return PreparedData(root, size)


MANIFEST = pd.DataFrame(
    {
        "image": [f"img{i}.png" for i in range(6)],
        "label": ["normal", "pneumonia"] * 3,
        "split": ["train", "train", "val", "val", "test", "test"],
        "pixel_hash": [f"h{i}" for i in range(6)],
        "patient_key": [f"p{i}" for i in range(6)],
        "view": ["PA"] * 6,
        "sex": ["F", "M"] * 3,
        "age": [50.0] * 6,
    }
)


def test_split_hash_is_the_content_not_names_or_order(tmp_path):
    base = _prepared(tmp_path / "a", MANIFEST)
    renamed = _prepared(tmp_path / "b", MANIFEST.assign(image=[f"x{i}.dcm" for i in range(6)]).iloc[::-1])
    relabelled = _prepared(tmp_path / "c", MANIFEST.assign(label=["pneumonia", "normal"] + ["normal", "pneumonia"] * 2))
    assert base.split_hash("train") == renamed.split_hash("train")
    assert base.split_hash("train") != relabelled.split_hash("train")
    assert base.split_hash("val") == relabelled.split_hash("val") != base.split_hash("train")


def test_training_run_logs_its_splits_as_datasets(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "s").mkdir()
    cfg = _cfg(tmp_path, "s")
    data = _prepared(tmp_path / "prepared", MANIFEST)
    with tracking.run(cfg, name="train test") as active:
        tracking.log_training_inputs(cfg, data)
    inputs = mlflow.MlflowClient().get_run(active.info.run_id).inputs.dataset_inputs
    by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
    assert by_context.keys() == {"training", "validation", "testing"}
    for split, context in tracking.DATASET_CONTEXTS.items():
        dataset = by_context[context]
        assert dataset.name == f"synthetic {split}"
        assert dataset.digest == data.split_hash(split)[: tracking.DIGEST_CHARS]
        assert json.loads(dataset.profile)["num_rows"] == 2
        assert "patient_key" not in dataset.schema and "image" not in dataset.schema  # no paths, no patient keys
        assert json.loads(dataset.source)["uri"].endswith("manifest.csv")
