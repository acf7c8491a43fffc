"""Tests for cxr.evaluation.plots: each plot writes a real, non-trivial PNG without touching pyplot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.evaluation import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _binary(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    s = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.5 * y - 0.8)))
    return y, s


def _check_png(path: Path, size=(500, 500)) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        if size is not None:
            assert im.size == size
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert pixels.std() > 5  # something was drawn, not a blank canvas
    return pixels


def test_plot_roc_writes_png_and_marks_operating_point(tmp_path):
    y, s = _binary()
    plain = plots.plot_roc(y, s, tmp_path / "roc.png")
    marked = plots.plot_roc(y, s, tmp_path / "nested" / "roc_thr.png", threshold=0.4, title="Test ROC")
    assert plain == tmp_path / "roc.png" and marked.parent.name == "nested"
    a, b = _check_png(plain), _check_png(marked)
    assert not np.array_equal(a, b)


def test_plot_pr_writes_png(tmp_path):
    y, s = _binary(seed=1)
    a = _check_png(plots.plot_pr(y, s, tmp_path / "pr.png"))
    b = _check_png(plots.plot_pr(y, s, tmp_path / "pr_thr.png", threshold=0.5))
    assert not np.array_equal(a, b)
    # A threshold above every score has no defined PPV: no marker, still a valid plot.
    c = _check_png(plots.plot_pr(y, s, tmp_path / "pr_none.png", threshold=2.0))
    assert np.array_equal(a, c)


def test_plot_calibration_writes_png(tmp_path):
    y, s = _binary(seed=2)
    _check_png(plots.plot_calibration(y, s, tmp_path / "cal.png", bins=10))
    with pytest.raises(ValueError, match="probabilities"):
        plots.plot_calibration(y, s * 4 - 2, tmp_path / "bad.png")


def test_plot_confusion_from_matrix_and_binary_dict(tmp_path):
    cm = np.array([[50, 3, 2, 1], [4, 40, 6, 0], [1, 2, 60, 5], [0, 1, 7, 30]])
    names = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
    _check_png(plots.plot_confusion(cm, names, tmp_path / "cm.png"))
    conf = {"tn": 300, "fp": 50, "fn": 30, "tp": 120}
    a = _check_png(plots.plot_confusion(conf, ["No pneumonia", "Pneumonia"], tmp_path / "cm2.png"))
    b = _check_png(plots.plot_confusion([[300, 50], [30, 120]], ["No pneumonia", "Pneumonia"], tmp_path / "cm3.png"))
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="class names"):
        plots.plot_confusion(cm, names[:3], tmp_path / "x.png")
    with pytest.raises(ValueError, match="square"):
        plots.plot_confusion(cm[:3], names, tmp_path / "x.png")


def test_plot_confusion_grows_for_many_classes(tmp_path):
    k = 14
    cm = np.random.default_rng(0).integers(0, 50, (k, k))
    path = plots.plot_confusion(cm, [f"finding_{i}" for i in range(k)], tmp_path / "cm14.png")
    with Image.open(path) as im:
        assert im.size[0] > 500 and im.size[0] == im.size[1]


def test_plot_roc_per_class_multiclass_and_multilabel(tmp_path):
    rng = np.random.default_rng(3)
    n, k = 300, 4
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    names = ["Normal", "COVID", "Lung_Opacity", "Viral Pneumonia"]
    _check_png(plots.plot_roc_per_class(y, probs, names, tmp_path / "mc.png"))
    Y = (rng.random((n, k)) < 0.3).astype(int)
    Y[:, 2] = 0  # a finding absent from the sample: no curve, no crash
    _check_png(plots.plot_roc_per_class(Y, probs, names, tmp_path / "ml.png"))
    with pytest.raises(ValueError, match="class names"):
        plots.plot_roc_per_class(y, probs, names[:2], tmp_path / "x.png")
    with pytest.raises(ValueError, match="y_true"):
        plots.plot_roc_per_class(Y[:, :2], probs, names, tmp_path / "x.png")


def test_single_class_roc_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="both positive and negative"):
        plots.plot_roc(np.zeros(10, int), np.linspace(0, 1, 10), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_import_does_not_touch_pyplot_or_global_backend():
    # rcParams["backend"] itself would import pyplot to resolve an automatic backend, so the raw
    # stored value is compared instead.
    code = (
        "import sys, matplotlib; raw = lambda: dict.__getitem__(matplotlib.rcParams, 'backend');"
        "before = raw(); import cxr.evaluation.plots;"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported';"
        "assert raw() == before, 'backend changed'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
