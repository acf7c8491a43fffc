"""prepare on the real data in ../shared/data: official splits kept, patient-level splits leak nothing."""

from __future__ import annotations

import pandas as pd
import pytest

from cxr.config import Config
from cxr.data.ingest import ingest
from cxr.data.prepare import prepare

pytestmark = pytest.mark.realdata


def run(tmp_path, **overrides):
    cfg = Config().override(
        {
            "paths.raw": str(tmp_path / "raw"),
            "paths.prepared": str(tmp_path / "prepared"),
            "prepare.sizes": [28],
            "model.image_size": 28,
            **overrides,
        }
    )
    ingest(cfg)
    return prepare(cfg), pd.read_csv(tmp_path / "prepared" / "manifest.csv")


def test_pneumoniamnist_keeps_the_official_splits(shared_data, tmp_path):
    card, manifest = run(
        tmp_path, **{"data.source": "medmnist", "data.path": str(shared_data / "pneumoniamnist" / "pneumoniamnist.npz")}
    )
    assert card["images_per_split"] == {"train": 4708, "val": 524, "test": 624}
    assert card["counts"] == {
        "train": {"normal": 1214, "pneumonia": 3494},
        "val": {"normal": 135, "pneumonia": 389},
        "test": {"normal": 234, "pneumonia": 390},
    }
    assert card["n_rejected"] == 0


def test_kermany_splits_share_no_patient_and_no_pixels(shared_data, tmp_path):
    card, manifest = run(tmp_path, **{"data.source": "kermany", "data.path": str(shared_data / "kermany224")})
    assert card["n_images"] == 5216 and set(card["images_per_split"]) == {"train", "val", "test"}
    per_patient = manifest.groupby("patient_key")["split"].nunique()
    assert (per_patient == 1).all() and card["patients_in_two_splits"] == 0
    assert manifest.groupby("pixel_hash")["split"].nunique().max() == 1
    # byte-identical files (per the published checksums) are found by pixel hash and kept in one split
    sums = pd.read_csv(shared_data / "kermany224" / "SHA256SUMS", sep=r"\s+", header=None, names=["sha", "file"])
    duplicated_files = int(sums.duplicated("sha", keep=False).sum())
    assert duplicated_files > 0
    assert card["duplicates"]["images_with_identical_pixels"] >= duplicated_files
    assert card["duplicates"]["groups_across_splits"] == 0
