"""The real CLI end to end on synthetic DICOMs: ingest, prepare, train 1 epoch, evaluate; then the Predictor."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxr.imaging import read_image
from cxr.models.predictor import Predictor
from cxr.tracking.runs import use_store
from cxr.tracking.uris import load_predictor
from support.cli import cxr_here, flags

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

TINY = [
    "data.synthetic.n_patients=40",
    "data.synthetic.size=96",
    "prepare.sizes=[32]",
    "model.image_size=32",
    "model.width=8",
    "train.epochs=1",
    "train.batch_size=16",
    "evaluate.bootstrap=50",
    "prepare.workers=1",
]


def cxr(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return cxr_here(workdir, *args, check=check)  # the messages users see are tested as a process in test_user_errors


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder after `cxr ingest/prepare/train/evaluate` with MLflow tracking on."""
    work = tmp_path_factory.mktemp("project")
    for step in ("ingest", "prepare", "train", "evaluate"):
        cxr_here(work, step, overrides=TINY)
    return work


def test_cli_pipeline_writes_model_reports_and_mlflow_run(project: Path):
    model = project / "models" / "cxr"
    info = json.loads((model / "model.json").read_text())
    assert info["task"] == "binary" and info["labels"] == ["normal", "pneumonia"]
    assert 0 < info["threshold"] < 1 and info["preprocess"]["size"] == 32
    assert info["training"]["synthetic"] is True
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert {"val", "test"} <= set(metrics) and 0 <= metrics["test"]["auroc"] <= 1
    for plot in ("roc", "pr", "confusion", "calibration"):
        assert (project / "reports" / "plots" / f"{plot}.png").stat().st_size > 1000
    import mlflow

    use_store(f"sqlite:///{project / 'mlflow.db'}")
    run = mlflow.get_run(info["training"]["run_id"])
    assert run.data.params["model.arch"] == "simple_cnn"
    assert "val_auroc" in run.data.metrics and "test_auroc" in run.data.metrics
    assert run.data.tags["dataset_hash"] == info["training"]["dataset_hash"]
    assert run.data.tags["synthetic_data"] == "true"
    env = info["training"]["environment"]  # what a rerun needs: the lock, torch, the CPU's instructions
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads() >= 1
    assert env["lock_sha256"] == hashlib.sha256((REPO / "requirements.lock").read_bytes()).hexdigest()
    for key in ("torch", "cpu_capability", "lock_sha256"):
        assert run.data.tags[f"env.{key}"] == str(env[key]), key
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_auroc")
    assert len(history) == 1


def test_predictor_on_raw_file_matches_evaluation_on_prepared_array(project: Path):
    predictor = Predictor.from_dir(project / "models" / "cxr")
    prepared = project / "data" / "prepared"
    manifest = pd.read_csv(prepared / "manifest.csv")
    arrays = np.load(prepared / "images_32.npy")
    rows = [0, 5, len(manifest) - 1]
    from_arrays = predictor.predict_proba(arrays[rows])
    from_files = [predictor.predict_files([project / "data" / "raw" / manifest["image"][r]])[0] for r in rows]
    from_files = np.array([f["probabilities"]["pneumonia"] for f in from_files])
    np.testing.assert_allclose(from_files, from_arrays, rtol=0, atol=1e-6)
    # the DICOMs include MONOCHROME1 and JPEG 2000 files: the same path handles them all
    assert {read_image(project / "data" / "raw" / p).meta["photometric"] for p in manifest["image"]} == {
        "MONOCHROME1",
        "MONOCHROME2",
    }


def test_mlflow_uri_loads_the_same_model(project: Path):
    info = json.loads((project / "models" / "cxr" / "model.json").read_text())
    use_store(f"sqlite:///{project / 'mlflow.db'}")
    local = Predictor.from_dir(project / "models" / "cxr")
    remote = load_predictor(f"runs:/{info['training']['run_id']}/model")
    x = np.load(project / "data" / "prepared" / "images_32.npy")[:4]
    np.testing.assert_array_equal(local.predict_proba(x), remote.predict_proba(x))


def test_loading_a_model_never_unpickles(project: Path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("model loading called the unpickler")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    real_torch_load = torch.load
    monkeypatch.setattr(
        torch, "load", lambda *a, **k: refuse() if not k.get("weights_only") else real_torch_load(*a, **k)
    )
    predictor = Predictor.from_dir(project / "models" / "cxr")
    assert predictor.predict_proba(np.zeros((2, 32, 32), np.uint8)).shape == (2,)
    assert sorted(p.name for p in (project / "models" / "cxr").iterdir()) == ["model.json", "model.safetensors"]


def test_wrong_arch_and_missing_weights_fail_clearly(project: Path):
    res = cxr(project, "train", *flags([*TINY, "model.arch=resnet19"]), check=False)
    assert res.returncode == 2 and "resnet19" in res.stderr and "resnet18" in res.stderr
    assert "Traceback" not in res.stderr
    res = cxr(project, "train", *flags([*TINY, "model.arch=resnet18", "model.weights=/nonexistent/w.pth"]), check=False)
    assert res.returncode == 2 and "/nonexistent/w.pth" in res.stderr and "Traceback" not in res.stderr


def test_unknown_config_key_fails_clearly(project: Path):
    res = cxr(project, "prepare", "-s", "prepare.sizez=[32]", check=False)
    assert res.returncode == 2 and "prepare.sizez" in res.stderr and "Traceback" not in res.stderr
