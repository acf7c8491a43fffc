"""`torchrun --nproc-per-node 2 -m cxr train` (gloo on CPU) against one process on the same data, seed and
global batch: one MLflow run, one saved model, the same optimizer steps per epoch, about the same val AUROC."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image as PILImage

from cxr.config import Config
from cxr.data.ingest import ingest
from cxr.data.prepare import prepare
from cxr.tracking.runs import use_store

pytestmark = pytest.mark.slow
BATCH, EPOCHS = 16, 8
SETTINGS = {"prepare.sizes": [32], "model.image_size": 32, "prepare.workers": 1}


def write_easy_images(root: Path, n: int = 120) -> Path:
    """Noisy films where pneumonia is a bright square: easy enough that both runs learn it the same way."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = "pneumonia" if i % 5 < 2 else "normal"
        arr = rng.normal(110, 20, (40, 40))
        if label == "pneumonia":
            arr[10:30, 10:30] += 100
        PILImage.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / f"{i}.png")
        rows.append({"path": f"{i}.png", "label": label, "patient_id": f"P{i}"})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp_data")
    (root / "src").mkdir()
    cfg = Config().override(
        {"data.source": "manifest", "data.path": str(write_easy_images(root / "src")),
         "paths.raw": str(root / "raw"), "paths.prepared": str(root / "prepared"), **SETTINGS}
    )  # fmt: skip
    ingest(cfg)
    prepare(cfg)
    return root / "prepared"


def train(workdir: Path, prepared: Path, launcher: list[str]) -> subprocess.CompletedProcess:
    workdir.mkdir()
    sets = {**SETTINGS, "paths.prepared": prepared, "paths.model": workdir / "model", "model.width": 8,
            "train.epochs": EPOCHS, "train.batch_size": BATCH, "train.augment.strength": 1.0, "evaluate.threshold_augmented_copies": 2,
            "mlflow.tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}", "mlflow.artifact_location": workdir / "art"}  # fmt: skip
    args = [a for k, v in sets.items() for a in ("-s", f"{k}={json.dumps(v) if isinstance(v, list) else v}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CXR_NO_PROGRESS": "1"}
    res = subprocess.run([*launcher, "-m", "cxr", "train", *args], cwd=workdir, env=env, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    assert res.returncode == 0, f"{launcher} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


@pytest.fixture(scope="module")
def runs(prepared: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp_runs")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    outputs = {
        "single": train(root / "single", prepared, [sys.executable]),
        "ddp": train(root / "ddp", prepared, torchrun),
    }
    assert outputs["ddp"].stderr.count("trained simple_cnn") == 1, outputs["ddp"].stderr  # rank 0 reports alone
    return {name: root / name for name in outputs}


def only_run(workdir: Path) -> mlflow.entities.Run:
    use_store(f"sqlite:///{workdir / 'mlflow.db'}")
    found = mlflow.search_runs(experiment_names=["cxr"], output_format="list")
    assert len(found) == 1, [r.info.run_id for r in found]
    return found[0]


def test_two_processes_log_one_run_and_save_one_model(runs):
    run = only_run(runs["ddp"])
    card = json.loads((runs["ddp"] / "model" / "model.json").read_text())
    assert card["training"]["run_id"] == run.info.run_id
    assert sorted(p.name for p in runs["ddp"].iterdir()) == ["art", "mlflow.db", "model"]  # nothing else saved
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in models] == [run.info.run_id]


def test_two_processes_take_the_single_process_optimizer_steps(runs, prepared):
    n_train = int((pd.read_csv(prepared / "manifest.csv")["split"] == "train").sum())
    steps = {}
    for name, workdir in runs.items():
        run = only_run(workdir)
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_steps")
        steps[name] = [int(m.value) for m in sorted(history, key=lambda m: m.step)]
    assert steps["ddp"] == steps["single"] == [math.ceil(n_train / BATCH)] * EPOCHS


def test_two_processes_reach_the_single_process_val_auroc(runs):
    auroc = {n: json.loads((w / "model" / "model.json").read_text())["training"]["val_auroc"] for n, w in runs.items()}
    assert auroc["single"] > 0.9  # the set is easy: a run that learnt nothing cannot pass by matching another
    assert abs(auroc["ddp"] - auroc["single"]) <= 0.01, auroc
