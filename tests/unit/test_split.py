"""Patient-level, stratified, deterministic splits that respect official splits and duplicate pixels."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxr.data.split import assign_splits, leaks, merge_groups


def manifest(n_patients=200, per_patient=3, official=None, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = "pneumonia" if rng.random() < 0.3 else "normal"
        for k in range(rng.integers(1, per_patient + 1)):
            rows.append(
                {
                    "image": f"{p}_{k}.png",
                    "label": label,
                    "patient_key": f"p{p}",
                    "split": official(p) if official else None,
                    "pixel_hash": f"h{p}_{k}",
                }
            )
    return pd.DataFrame(rows)


def test_patient_level_stratified_and_deterministic():
    m = manifest()
    a = assign_splits(m, val=0.15, test=0.15, seed=1)
    b = assign_splits(m, val=0.15, test=0.15, seed=1)
    assert a.equals(b)
    assert not assign_splits(m, val=0.15, test=0.15, seed=2).equals(a)
    assert leaks(m, a, "patient_key") == []
    share = a.value_counts(normalize=True)
    assert abs(share["test"] - 0.15) < 0.05 and abs(share["val"] - 0.15) < 0.05
    prevalence = m.groupby(a)["label"].apply(lambda s: (s == "pneumonia").mean())
    assert prevalence.max() - prevalence.min() < 0.1


def test_official_splits_are_kept_and_missing_val_is_cut_from_train():
    m = manifest(official=lambda p: "test" if p % 5 == 0 else "train")
    s = assign_splits(m, val=0.1, test=0.2, seed=0)
    assert (s[m["split"] == "test"] == "test").all()
    assert set(s[m["split"] == "train"]) == {"train", "val"}
    assert leaks(m, s, "patient_key") == []


def test_train_only_source_gets_val_and_test():
    m = manifest(official=lambda p: "train")
    s = assign_splits(m, val=0.15, test=0.15, seed=0)
    assert set(s) == {"train", "val", "test"} and leaks(m, s, "patient_key") == []


def test_identical_pixels_under_two_patients_stay_together():
    m = manifest(n_patients=100, per_patient=1)
    # every patient p shares one film with patient p+50: both ids must land in one split
    m.loc[m.index[50:100], "pixel_hash"] = m["pixel_hash"].iloc[:50].to_numpy()
    groups = merge_groups(m["patient_key"], m["pixel_hash"])
    assert len(np.unique(groups)) == 50
    s = assign_splits(m, val=0.2, test=0.2, seed=0, groups=groups)
    assert leaks(m, s, "pixel_hash") == []
    without = assign_splits(m, val=0.2, test=0.2, seed=0)
    assert leaks(m, without, "pixel_hash"), "the check above would pass trivially"
