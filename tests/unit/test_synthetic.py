"""The embedded synthetic DICOM source: deterministic, decodable, every encoding present, lesions in the lungs."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxr.config import Config
from cxr.data.sources import build_source
from cxr.data.sources.synthetic import render_layers
from cxr.imaging import read_image


def build(tmp_path, name, n=10):
    cfg = Config().override({"data.synthetic.n_patients": n, "data.synthetic.size": 64})
    return build_source(cfg, tmp_path / name)


def test_deterministic_and_decodable_with_every_encoding(tmp_path):
    a, b = build(tmp_path, "a"), build(tmp_path, "b")
    pd.testing.assert_frame_equal(a.manifest, b.manifest)
    kinds = set()
    for rel in a.manifest["image"]:
        img_a, img_b = read_image(tmp_path / "a" / rel), read_image(tmp_path / "b" / rel)
        np.testing.assert_array_equal(img_a.pixels, img_b.pixels)
        kinds |= {img_a.meta["photometric"], img_a.meta["transfer_syntax"], f"{img_a.meta['bits']}bit"}
    assert {"MONOCHROME1", "MONOCHROME2", "12bit"} <= kinds
    assert any("2000" in k for k in kinds), kinds
    assert a.task == "binary" and a.classes == ["normal", "pneumonia"] and a.files_in_raw
    assert any("synthetic" in note.lower() for note in a.notes)


def test_patients_and_no_raw_ids(tmp_path):
    data = build(tmp_path, "a", n=12)
    m = data.manifest
    assert m["patient_key"].nunique() == 12 and len(m) >= 12
    assert (m.groupby("patient_key")["label"].nunique() == 1).all()  # a patient's label is fixed
    assert not m.astype(str).apply(lambda col: col.str.contains("SYN")).any().any()
    assert set(m["source"]) == {"synthetic"}


def test_monochrome1_files_decode_in_display_orientation(tmp_path):
    data = build(tmp_path, "a", n=10)
    for rel in data.manifest["image"]:
        img = read_image(tmp_path / "a" / rel)
        px = img.pixels
        h, w = px.shape
        lungs = np.median(px[h // 3 : h // 2, w // 5 : w // 3])
        mediastinum = np.median(px[h // 3 : 2 * h // 3, w // 2 - w // 16 : w // 2 + w // 16])
        assert lungs < mediastinum, (rel, img.meta["photometric"])


def test_consolidations_only_inside_the_lungs():
    for seed in range(5):
        r = render_layers(np.random.default_rng(seed), "pneumonia", 0.3, 96, lesion_free=True)
        diff = np.abs(r.image - r.lesion_free)
        assert diff[r.lung_mask].max() > 0.01
        assert diff[~r.lung_mask].max() < 1e-6
        normal = render_layers(np.random.default_rng(seed), "normal", 0.3, 96)
        assert not normal.lesion.any()
