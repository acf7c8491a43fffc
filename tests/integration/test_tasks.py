"""Binary, multi-class and multi-label tasks, tabular fusion and the classical baseline, through fit -> evaluate."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image as PILImage

from cxr.config import Config
from cxr.data.ingest import ingest
from cxr.data.loader import PreparedData
from cxr.data.prepare import prepare
from cxr.evaluation.evaluate import evaluate, score_split
from cxr.evaluation.metrics import choose_threshold
from cxr.models.predictor import Predictor
from cxr.tracking.uris import load_predictor
from cxr.training.callbacks import EpochFigures
from cxr.training.fit import fit
from cxr.training.threshold import threshold_scores

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
        rows.append(
            {
                "path": f"{i}.png",
                "label": label,
                "patient_id": f"P{i}",
                "age": 20 + i % 60,
                "sex": "MF"[i % 2],
                "view": ["PA", "AP"][i % 2],
            }
        )
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


def run(tmp_path, labels, task, fit_kwargs=None, **extra):
    src = tmp_path / "src"
    src.mkdir()
    cfg = Config().override(
        {
            "data.source": "manifest",
            "data.path": str(write_images(src, labels)),
            "data.manifest_task": task,
            "paths.raw": str(tmp_path / "raw"),
            "paths.prepared": str(tmp_path / "prepared"),
            "paths.model": str(tmp_path / "model"),
            "paths.reports": str(tmp_path / "reports"),
            "prepare.sizes": [32],
            "model.image_size": 32,
            "prepare.workers": 1,
            "model.width": 8,
            "train.epochs": 10,
            "train.batch_size": 32,
            "evaluate.bootstrap": 20,
            "mlflow.enabled": False,
            **extra,
        }
    )
    ingest(cfg)
    prepare(cfg)
    result = fit(cfg, **(fit_kwargs or {}))
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
    scores = p.score(np.load(tmp_path / "prepared" / "images_32.npy")[:1])
    out = p.describe(scores.probs[0], **scores.of(0))
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
    cfg, result, report = run(
        tmp_path,
        [("covid" if lab == "pneumonia" else "normal") for lab in labels],
        "binary",
        **{"model.arch": "logistic_regression", "data.positive_label": "covid"},
    )
    p = Predictor.from_dir(cfg.paths.model)
    assert p.card.arch == "logistic_regression"
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
        cfgs[name], _, _ = run(
            tmp_path / name,
            labels,
            "binary",
            **{
                "train.epochs": 2,
                "train.precision": precision,
                "evaluate.threshold": "youden",
                "evaluate.threshold_augmented_copies": 0,
            },
        )
        weights[name] = (tmp_path / name / "model" / "model.safetensors").read_bytes()
    assert weights["bf16_a"] == weights["bf16_b"]
    assert weights["bf16_a"] != weights["fp32"]
    # The threshold is chosen on the scores the saved (fp32) Predictor gives, as evaluation and serving use it.
    cfg = cfgs["bf16_a"]
    predictor = Predictor.from_dir(cfg.paths.model)
    _, y, probs = score_split(predictor, PreparedData(cfg.paths.prepared, 32), "val")
    assert predictor.threshold == pytest.approx(choose_threshold(y, probs), rel=1e-6)


def test_ensemble_trains_seeded_members_and_saves_them_as_one_model(tmp_path):
    """train.ensemble=2: members trained from seeds 7 and 8, the first being the network seed 7 trains alone
    (the split depends on the seed too, so only that one is comparable); the threshold is the ensemble's own."""
    labels = ["pneumonia" if i % 3 == 0 else "normal" for i in range(96)]
    (tmp_path / "alone").mkdir(), (tmp_path / "ensemble").mkdir()
    cfg_alone, _, _ = run(tmp_path / "alone", labels, "binary", **{"train.epochs": 2, "project.seed": 7})
    cfg, result, report = run(
        tmp_path / "ensemble",
        labels,
        "binary",
        **{
            "train.epochs": 2,
            "project.seed": 7,
            "train.ensemble": 2,
            "evaluate.threshold": "youden",
            "evaluate.threshold_augmented_copies": 0,
            "mlflow.enabled": True,
            "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "mlflow.artifact_location": str(tmp_path / "mlartifacts"),
        },
    )
    predictor = Predictor.from_dir(cfg.paths.model)
    assert predictor.card.arch == "ensemble" and len(predictor.model.members) == 2
    alone = Predictor.from_dir(cfg_alone.paths.model).model.state_dict()
    first, second = (m.state_dict() for m in predictor.model.members)
    assert alone.keys() == first.keys() and all(torch.equal(alone[k], first[k]) for k in alone)
    assert not torch.equal(first["head.weight"], second["head.weight"])
    assert [m.seed for m in predictor.card.training.members] == [7, 8]
    assert len(result.best_epoch) == 2 and result.epochs_trained == 4
    # the threshold and the validation AUROC are the saved ensemble's, as evaluation and serving score it
    _, y, probs = score_split(predictor, PreparedData(cfg.paths.prepared, 32), "val")
    assert predictor.threshold == pytest.approx(choose_threshold(y, probs), rel=1e-6)
    from sklearn.metrics import roc_auc_score

    assert result.best_val_auroc == pytest.approx(roc_auc_score(y, probs), abs=1e-6)
    assert report["model"]["threshold"] == predictor.threshold
    import mlflow

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    metrics = mlflow.get_run(result.run_id).data.metrics
    assert {"member1/val_auroc", "member2/val_auroc", "best_val_auroc"} <= set(metrics)


def test_test_time_augmentation_is_saved_with_the_network_and_scored_as_served(tmp_path):
    """model.tta_views=3: the network trains exactly as without it; the saved model averages 3 fixed views
    drawn from train.augment at model.tta_strength, and the threshold, validation AUROC, evaluation, the
    MLflow model and Grad-CAM all use that saved model."""
    from sklearn.metrics import roc_auc_score

    from cxr.data.augment import draw_augment
    from cxr.serving.explain import explain

    labels = ["pneumonia" if i % 3 == 0 else "normal" for i in range(96)]
    (tmp_path / "plain").mkdir(), (tmp_path / "tta").mkdir()
    cfg_plain, _, _ = run(tmp_path / "plain", labels, "binary", **{"train.epochs": 2})
    cfg, result, report = run(
        tmp_path / "tta",
        labels,
        "binary",
        **{
            "train.epochs": 2,
            "model.tta_views": 3,
            "model.tta_strength": 1.5,
            "mlflow.enabled": True,
            "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "mlflow.artifact_location": str(tmp_path / "mlartifacts"),
        },
    )
    predictor = Predictor.from_dir(cfg.paths.model)
    assert predictor.card.arch == "tta"
    plain = Predictor.from_dir(cfg_plain.paths.model).model.state_dict()
    network = predictor.model.network.state_dict()
    assert plain.keys() == network.keys() and all(torch.equal(plain[k], network[k]) for k in plain)
    views = draw_augment(3, cfg.train.augment.model_copy(update={"strength": 1.5}), torch.Generator().manual_seed(42))
    torch.testing.assert_close(predictor.model.views, views)
    data = PreparedData(cfg.paths.prepared, 32)
    idx, y, probs = score_split(predictor, data, "val")
    assert result.best_val_auroc == pytest.approx(roc_auc_score(y, probs), abs=1e-6)
    y_aug, p_aug = threshold_scores(predictor.model, data, idx, probs, cfg, torch.device("cpu"))
    assert predictor.threshold == pytest.approx(choose_threshold(y_aug, p_aug, cfg.evaluate.threshold), rel=1e-6)
    _, yt, pt = score_split(predictor, data, "test")
    assert report["splits"]["test"]["auroc"]["value"] == pytest.approx(roc_auc_score(yt, pt), abs=1e-9)
    plain_scores = score_split(Predictor.from_dir(cfg_plain.paths.model), data, "test")[2]
    assert not np.allclose(pt, plain_scores, rtol=0, atol=1e-7)  # 2 epochs: the scores are still close together
    served = load_predictor(f"runs:/{result.run_id}/model")  # the logged MLflow model rebuilds it too
    np.testing.assert_allclose(served.predict_proba(data.images[idx[:8]]), probs[:8], rtol=1e-5, atol=1e-6)
    image = predictor.read(tmp_path / "tta" / "src" / "0.png")
    shown = explain(predictor, image)  # the network's map, beside the saved model's probability
    assert shown.probability == pytest.approx(float(predictor.predict_proba(predictor.prepare_input(image))[0]))
    assert shown.heatmap.max() > 0


def test_threshold_is_chosen_on_augmented_copies_of_validation(tmp_path):
    """evaluate.threshold_augmented_copies=3: the saved threshold is the rule applied to 3 seeded augmented
    copies of the validation split, scored like the saved Predictor scores; not the clean films' cut-off."""
    labels = ["pneumonia" if i % 3 == 0 else "normal" for i in range(160)]
    cfg, _, report = run(
        tmp_path, labels, "binary", **{"evaluate.threshold": "youden", "evaluate.threshold_augmented_copies": 3}
    )
    predictor = Predictor.from_dir(cfg.paths.model)
    assert predictor.card.threshold_augmented_copies == 3
    data = PreparedData(cfg.paths.prepared, 32)
    idx, y, clean = score_split(predictor, data, "val")
    y3, p3 = threshold_scores(predictor.model, data, idx, clean, cfg, torch.device("cpu"))
    assert len(y3) == len(p3) == 3 * len(idx) and np.array_equal(y3[: len(idx)], y)
    assert not np.allclose(p3[: len(idx)], clean) and not np.allclose(p3[: len(idx)], p3[len(idx) : 2 * len(idx)])
    assert predictor.threshold == pytest.approx(choose_threshold(y3, p3), rel=1e-6)
    assert predictor.threshold != pytest.approx(choose_threshold(y, clean), rel=1e-3)
    assert report["model"]["threshold_augmented_copies"] == 3


def test_epoch_figures_see_the_validated_model_after_every_epoch_and_change_nothing(tmp_path):
    """fit(callbacks=[EpochFigures(hook)]) (quality.py --trace scores the test split with it): called after every epoch with
    the model validation scored (the hook's own validation AUROC equals the epoch's), its figures join that
    epoch's history row, and training is the same as without it."""
    from sklearn.metrics import roc_auc_score

    from cxr.training.scoring import predict_split

    def hook(model):
        data = PreparedData(tmp_path / "hook" / "prepared", 32)
        val = data.split("val")
        probs = predict_split(model, data, val, 64, torch.device("cpu"), data.task, "fp32")
        return {"hook_val_auroc": roc_auc_score(data.targets[val], probs)}

    labels = ["pneumonia" if i % 3 == 0 else "normal" for i in range(96)]
    (tmp_path / "plain").mkdir(), (tmp_path / "hook").mkdir()
    _, plain, _ = run(tmp_path / "plain", labels, "binary", **{"train.epochs": 3})
    _, hooked, _ = run(
        tmp_path / "hook", labels, "binary", fit_kwargs={"callbacks": [EpochFigures(hook)]}, **{"train.epochs": 3}
    )
    assert len(hooked.history) == 3
    val = [row["val_auroc"] for row in hooked.history]
    assert [row["hook_val_auroc"] for row in hooked.history] == pytest.approx(val, abs=1e-6)
    assert len(set(val)) > 1  # the model changed between epochs, and the hook followed it
    assert val == [row["val_auroc"] for row in plain.history]
    assert "hook_val_auroc" not in plain.history[0]


def test_early_stopping_can_monitor_augmented_validation(tmp_path, monkeypatch):
    """train.early_stopping.monitor=augmented_val_auroc: the epoch saved, and when training stops, follow the
    yardstick's AUROC (made to peak at epoch 1 here), not the clean validation AUROC (which peaks later)."""
    from sklearn.metrics import roc_auc_score

    from cxr.training.scoring import Yardstick

    told = iter([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    monkeypatch.setattr(Yardstick, "auroc", lambda self, *args: next(told))
    labels = ["pneumonia" if i % 3 == 0 else "normal" for i in range(96)]
    cfg, result, _ = run(
        tmp_path,
        labels,
        "binary",
        **{
            "train.epochs": 6,
            "train.early_stopping.patience": 2,
            "train.early_stopping.monitor": "augmented_val_auroc",
            "train.augment.strength": 2.0,  # pinned: on this tiny set clean validation then peaks after epoch 1
        },
    )
    clean = [row["val_auroc"] for row in result.history]
    assert max(clean) > clean[0]  # clean validation alone would have kept a later epoch
    assert [row["val_auroc_augmented"] for row in result.history] == [0.9, 0.8, 0.7]  # stopped after 2 worse epochs
    assert result.best_epoch == 1 and result.best_val_auroc == clean[0]
    _, y, probs = score_split(Predictor.from_dir(cfg.paths.model), PreparedData(cfg.paths.prepared, 32), "val")
    assert roc_auc_score(y, probs) == pytest.approx(clean[0], abs=1e-6)  # the saved weights are epoch 1's
