"""The sources on the real public data in ../shared/data (skipped where it is absent)."""

from __future__ import annotations

import csv
import gzip
import io
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.config import Config
from cxr.data.sources import SourceError, build_source
from cxr.data.sources.kermany import kermany_patient_id
from cxr.data.sources.nih import NIH_FINDINGS, parse_table
from cxr.data.sources.rsna import parse_labels

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
pytestmark = pytest.mark.realdata


def shared(relative: str) -> Path:
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"real data {path} is absent (only the shared workspace has it)")
    return path


def config(source: str, path: Path) -> Config:
    return Config().override({"data.source": source, "data.path": str(path)})


def test_pneumoniamnist_official_splits(tmp_path: Path) -> None:
    npz = shared("pneumoniamnist/pneumoniamnist.npz")
    data = build_source(config("medmnist", npz.parent), tmp_path)
    df = data.manifest
    counts = df.groupby(["split", "label"]).size().to_dict()
    assert counts == {
        ("train", "normal"): 1214, ("train", "pneumonia"): 3494,
        ("val", "normal"): 135, ("val", "pneumonia"): 389,
        ("test", "normal"): 234, ("test", "pneumonia"): 390,
    }  # fmt: skip
    assert len(list((tmp_path / "images").glob("*.png"))) == len(df) == 5856
    with np.load(npz) as z, Image.open(tmp_path / "images" / "test_00623.png") as im:
        np.testing.assert_array_equal(np.asarray(im), z["test_images"][623])
    assert df["patient_key"].is_unique


def test_kermany224_labels_and_patient_ids(tmp_path: Path) -> None:
    root = shared("kermany224")
    data = build_source(config("kermany", root), tmp_path)
    df = data.manifest
    assert df["label"].value_counts().to_dict() == {"normal": 1341, "pneumonia": 3875}
    assert set(df["split"]) == {"train"}
    assert df["subtype"].value_counts().to_dict() == {"bacteria": 2530, "normal": 1341, "virus": 1345}
    unparsed = [p for p in df["image"] if kermany_patient_id(Path(p).name) is None]
    assert unparsed == [] and not any("no Kermany patient id" in n for n in data.notes)
    # Several images per patient, so patients are fewer than images.
    assert df["patient_key"].nunique() < len(df)


def read_nih_findings() -> list[list[str]]:
    """The Finding Labels column, split with plain csv/str logic (independent of the source)."""
    with gzip.open(shared("samples/Data_Entry_2017_v2020.csv.gz"), "rt", newline="") as fh:
        return [row["Finding Labels"].split("|") for row in csv.DictReader(fh)]


def test_nih_table_label_counts() -> None:
    table = parse_table(shared("samples/Data_Entry_2017_v2020.csv.gz"), "multilabel")
    raw = read_nih_findings()
    assert len(table) == len(raw) == 112_120
    expected = Counter(f for row in raw for f in row)
    got = Counter(f for label in table["label"] for f in label.split("|") if f)
    got["No Finding"] = int((table["label"] == "").sum())
    assert got == expected
    assert (got["No Finding"], got["Hernia"], got["Pneumonia"]) == (60361, 227, 1431)  # published counts
    assert set(got) == {"No Finding", *NIH_FINDINGS}
    assert table["patient_key"].nunique() == 30_805
    assert table[["view", "sex", "age", "follow_up"]].notna().all().all()
    assert set(table["view"]) == {"PA", "AP"} and set(table["sex"]) == {"M", "F"}

    first = parse_table(shared("samples/Data_Entry_2017_v2020.csv.gz"), "first_finding")
    assert Counter(first["label"]) == Counter(row[0] for row in raw)


def test_nih_build_keeps_rows_with_images(tmp_path: Path) -> None:
    data = build_source(config("nih", shared("samples")), tmp_path)
    df = data.manifest
    assert sorted(Path(p).name for p in df["image"]) == ["00000001_000.png", "00027426_000.png"]
    labels = dict(zip(df["image"].map(lambda p: Path(p).name), df["label"]))
    assert labels == {"00000001_000.png": "Cardiomegaly", "00027426_000.png": ""}
    assert any("112118 of 112120 table rows dropped" in n for n in data.notes)


def test_rsna_labels_zip() -> None:
    zipped = shared("samples/kaggle_stage_2_train_labels.csv.zip")
    labels = parse_labels(zipped)
    with zipfile.ZipFile(zipped) as zf, zf.open("stage_2_train_labels.csv") as fh:
        rows = list(csv.DictReader(io.TextIOWrapper(fh, "utf-8")))
    positive = {r["patientId"] for r in rows if r["Target"] == "1"}
    assert len(labels) == len({r["patientId"] for r in rows}) == 26_684
    assert (labels["label"] == "pneumonia").sum() == len(positive) == 6012
    assert labels["boxes"].sum() == sum(r["Target"] == "1" for r in rows)


def test_rsna_without_dicoms_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="none of the 26684 labelled patients has a DICOM"):
        build_source(config("rsna", shared("samples")), tmp_path)
