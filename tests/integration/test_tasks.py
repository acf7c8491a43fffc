"""Binary, multi-class and multi-label tasks, tabular fusion and the classical baseline, through fit -> evaluate."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image as PILImage

from cxr.config import Config
from cxr.data.ingest import ingest
from cxr.data.loader import PreparedData
from cxr.data.prepare import prepare
from cxr.evaluate import evaluate, score_split
from cxr.metrics import choose_threshold
from cxr.predictor import Predictor
from cxr.train import fit

pytestmark = pytest.mark.slow
CLASSES = ["covid", "lung_opacity", "normal", "viral_pneumonia"]


def write_images(root, labels, seed=0):
    """Images whose brightness pattern depends on the label, so a tiny model can learn something."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, label in enumerate(labels):
        arr = rng.normal(100, 20, (40, 40))
        for k, name in enumerate(CLASSES):
            if name in label.split("|"):
                arr[k * 10 : k * 10 + 10, :] += 80
        PILImage.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / f"{i}.png")
        rows.append({"path": f"{i}.png", "label": label, "patient_id": f"P{i}", "age": 20 + i % 60,
                     "sex": "MF"[i % 2], "view": ["PA", "AP"][i % 2]})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


def run(tmp_path, labels, task, **extra):
    src = tmp_path / "src"
    src.mkdir()
    cfg = Config().override({
        "data.source": "manifest", "data.path": str(write_images(src, labels)), "data.manifest_task": task,
        "paths.raw": str(tmp_path / "raw"), "paths.prepared": str(tmp_path / "prepared"),
        "paths.model": str(tmp_path / "model"), "paths.reports": str(tmp_path / "reports"),
        "prepare.sizes": [32], "model.image_size": 32, "prepare.workers": 1, "model.width": 8,
        "train.epochs": 10, "train.batch_size": 32, "evaluate.bootstrap": 20, "mlflow.enabled": False, **extra,
    })
    ingest(cfg)
    prepare(cfg)
    result = fit(cfg)
    return cfg, result, evaluate(cfg)


def test_multiclass(tmp_path):
    labels = [CLASSES[i % 4] for i in range(160)]
    cfg, result, report = run(tmp_path, labels, "multiclass")
    p = Predictor.from_dir(cfg.paths.model)
    assert p.task == "multiclass" and p.labels == CLASSES and p.threshold is None
    probs = p.predict_proba(np.load(tmp_path / "prepared" / "images_32.npy")[:5])
    assert probs.shape == (5, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)
    test = report["splits"]["test"]
    assert set(test["per_class"]) == set(CLASSES) and len(test["confusion_matrix"]) == 4
    assert (tmp_path / "reports" / "plots" / "confusion.png").exists()
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text())["test"]["macro_auroc"] > 0.5


def test_multilabel_with_per_class_thresholds(tmp_path):
    combos = ["", "covid", "normal|viral_pneumonia", "lung_opacity", "covid|lung_opacity"]
    labels = [combos[i % len(combos)] for i in range(160)]
    cfg, result, report = run(tmp_path, labels, "multilabel")
    p = Predictor.from_dir(cfg.paths.model)
    assert p.task == "multilabel" and len(p.threshold) == 4
    out = p.describe(p.predict_proba(np.load(tmp_path / "prepared" / "images_32.npy")[:1])[0])
    assert isinstance(out["prediction"], list) and set(out["threshold"]) == set(CLASSES)
    assert set(report["splits"]["test"]["per_class"]) == set(CLASSES)


def test_tabular_fusion_uses_age_sex_view(tmp_path):
    labels = ["pneumonia" if i % 3 == 0 else "normal" for i in range(120)]
    cfg, result, report = run(tmp_path, labels, "binary", **{"model.tabular": True})
    p = Predictor.from_dir(cfg.paths.model)
    assert p.uses_tabular
    x = np.load(tmp_path / "prepared" / "images_32.npy")[:1]
    young = np.array([[0.05, 0, 1, 0, 0, 1, 0, 0]], np.float32)
    old = np.array([[0.85, 0, 0, 1, 0, 0, 1, 0]], np.float32)
    assert p.predict_proba(x, young)[0] != p.predict_proba(x, old)[0]


def test_logistic_regression_baseline_runs_through_the_same_evaluate(tmp_path):
    labels = ["pneumonia" if i % 3 == 0 else "normal" for i in range(120)]
    # the binary fixture brightens the "covid" band only for positives: make that the signal
    cfg, result, report = run(tmp_path, [("covid" if lab == "pneumonia" else "normal") for lab in labels], "binary",
                              **{"model.arch": "logistic_regression", "data.positive_label": "covid"})
    p = Predictor.from_dir(cfg.paths.model)
    assert p.info["architecture"]["arch"] == "logistic_regression"
    assert report["splits"]["test"]["auroc"]["value"] > 0.9


def test_training_is_deterministic_on_cpu(tmp_path):
    labels = ["pneumonia" if i % 3 == 0 else "normal" for i in range(96)]
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir(), b.mkdir()
    cfg_a, res_a, _ = run(a, labels, "binary", **{"train.epochs": 2})
    cfg_b, res_b, _ = run(b, labels, "binary", **{"train.epochs": 2})
    assert [h["val_auroc"] for h in res_a.history] == [h["val_auroc"] for h in res_b.history]
    assert (a / "model" / "model.safetensors").read_bytes() == (b / "model" / "model.safetensors").read_bytes()


def test_bf16_training_on_cpu_is_used_and_deterministic(tmp_path):
    """train.precision=bf16 runs the forward passes in bfloat16 on a CPU too, reproducibly; the threshold is fp32's."""
    labels = ["pneumonia" if i % 3 == 0 else "normal" for i in range(96)]
    weights, cfgs = {}, {}
    for name, precision in (("fp32", "fp32"), ("bf16_a", "bf16"), ("bf16_b", "bf16")):
        (tmp_path / name).mkdir()
        # the empirical Youden threshold is one of the validation scores: it shows which scores it was chosen on
        cfgs[name], _, _ = run(tmp_path / name, labels, "binary", **{"train.epochs": 2, "train.precision": precision,
                                                                      "evaluate.threshold": "youden"})
        weights[name] = (tmp_path / name / "model" / "model.safetensors").read_bytes()
    assert weights["bf16_a"] == weights["bf16_b"]
    assert weights["bf16_a"] != weights["fp32"]
    # The threshold is chosen on the scores the saved (fp32) Predictor gives, as evaluation and serving use it.
    cfg = cfgs["bf16_a"]
    predictor = Predictor.from_dir(cfg.paths.model)
    _, y, probs = score_split(predictor, PreparedData(cfg.paths.prepared, 32), "val")
    assert predictor.threshold == pytest.approx(choose_threshold(y, probs), rel=1e-6)
