"""ingest + prepare on a tiny team manifest: arrays match the one preprocessing path, failures are handled."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image as PILImage

import cxr.data.prepare as prepare_module
from cxr.config import Config
from cxr.data.ingest import ingest
from cxr.data.loader import PreparedData
from cxr.data.prepare import PrepareError, array_path, prepare
from cxr.imaging import read_image
from cxr.preprocess import PreprocessSpec, preprocess


def write_dataset(root, n_patients=30, broken=0):
    rng = np.random.default_rng(0)
    rows = []
    for p in range(n_patients):
        label = "pneumonia" if p % 3 == 0 else "normal"
        for k in range(2):
            arr = (rng.random((48, 40)) * 200 + (40 if label == "pneumonia" else 0)).astype(np.uint8)
            path = root / f"img_{p}_{k}.png"
            PILImage.fromarray(arr).save(path)
            rows.append({"path": path.name, "label": label, "patient_id": f"MRN{p:04d}", "sex": "F" if p % 2 else "M"})
    for b in range(broken):
        (root / f"broken_{b}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        rows.append({"path": f"broken_{b}.png", "label": "normal", "patient_id": f"B{b}"})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


def make_cfg(tmp_path, csv, **extra):
    return Config().override(
        {
            "data.source": "manifest",
            "data.path": str(csv),
            "paths.raw": str(tmp_path / "raw"),
            "paths.prepared": str(tmp_path / "prepared"),
            "prepare.sizes": [32, 64],
            "prepare.workers": 1,
            **extra,
        }
    )


def test_prepare_writes_arrays_from_the_single_preprocessing_function(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    cfg = make_cfg(tmp_path, write_dataset(src, broken=1))
    ingest(cfg)
    card = prepare(cfg)
    assert card["n_images"] == 60 and card["n_rejected"] == 1
    assert len(card["rejected"]) == 1 and "PNG" in card["rejected"][0]["reason"]
    assert card["patients_in_two_splits"] == 0 and set(card["images_per_split"]) == {"train", "val", "test"}
    prepared = pd.read_csv(tmp_path / "prepared" / "manifest.csv")
    raw = tmp_path / "raw"
    for size in (32, 64):
        arr = np.load(array_path(tmp_path / "prepared", size), mmap_mode="r")
        assert arr.shape == (60, size, size) and arr.dtype == np.uint8
        row = 7
        expected = preprocess(read_image(raw / prepared["image"][row]), PreprocessSpec(size=size))
        assert np.array_equal(arr[row], expected)
    # no raw patient id in anything prepare writes
    for f in (tmp_path / "prepared").iterdir():
        if f.suffix in (".csv", ".json"):
            assert "MRN0" not in f.read_text(), f


def test_too_many_failures_stop_the_stage_and_write_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    cfg = make_cfg(tmp_path, write_dataset(src, n_patients=5, broken=4), **{"prepare.max_failure_fraction": 0.1})
    ingest(cfg)
    with pytest.raises(PrepareError, match="could not be read"):
        prepare(cfg)
    assert not (tmp_path / "prepared").exists()
    assert not list(tmp_path.glob(".prepared*")), "temporary output left behind"


def test_prepare_is_deterministic(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    cfg = make_cfg(tmp_path, write_dataset(src))
    ingest(cfg)
    out = tmp_path / "prepared"
    first = prepare(cfg)
    written = {p.name: p.read_bytes() for p in out.iterdir()}
    second = prepare(cfg)
    assert first["dataset_hash"] == second["dataset_hash"] and first["input_hash"] == second["input_hash"]
    assert {"images_32.npy", "images_64.npy", "manifest.csv"} <= set(written)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == written  # arrays, manifest and card, byte for byte


def test_streamed_arrays_skip_rejected_rows_and_match_the_serial_path(tmp_path, monkeypatch):
    """Pool path (ordered imap), rows written through small memmap windows, broken files mid-list."""
    src = tmp_path / "src"
    src.mkdir()
    csv = write_dataset(src, n_patients=40, broken=4)
    rows = pd.read_csv(csv)
    rows.sample(frac=1.0, random_state=3).to_csv(csv, index=False)  # broken files land between good ones
    monkeypatch.setattr(prepare_module, "CHUNK_ROWS", 5)  # many windows, a partial last one
    cards = {}
    for workers in (1, 2):
        cfg = make_cfg(tmp_path, csv, **{"prepare.workers": workers, "paths.prepared": str(tmp_path / f"p{workers}")})
        ingest(cfg)
        cards[workers] = prepare(cfg)
    assert cards[1] == cards[2] and cards[2]["n_rejected"] == 4
    manifest = pd.read_csv(tmp_path / "p2" / "manifest.csv")
    for size in (32, 64):
        written = array_path(tmp_path / "p2", size).read_bytes()
        assert written == array_path(tmp_path / "p1", size).read_bytes()
        arr = np.load(array_path(tmp_path / "p2", size))
        saved = io.BytesIO()
        np.save(saved, arr)
        assert written == saved.getvalue(), "header or trailing bytes differ from np.save of the kept rows"
        assert arr.shape == (80, size, size)
        for i, image in enumerate(manifest["image"]):
            expected = preprocess(read_image(tmp_path / "raw" / image), PreprocessSpec(size=size))
            assert np.array_equal(arr[i], expected), (size, i)


def test_loader_reads_batches_from_the_read_only_map(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    cfg = make_cfg(tmp_path, write_dataset(src, n_patients=10))
    ingest(cfg)
    prepare(cfg)
    data = PreparedData(tmp_path / "prepared", 32)
    assert isinstance(data.images, np.memmap) and not data.images.flags.writeable
    index = np.arange(len(data.manifest))
    for x, _, _, rows in data.batches(index, 7, shuffle=True, generator=torch.Generator().manual_seed(0)):
        expected = torch.from_numpy(np.asarray(data.images[rows])).unsqueeze(1).float() / 255.0
        assert torch.equal(x, expected)
