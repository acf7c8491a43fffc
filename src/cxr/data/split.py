"""Deterministic, stratified, patient-level splits.

Images are grouped by patient, and groups joined by identical pixels (the same film filed under two
patient ids) are merged, so no patient and no duplicate image can sit in two splits. Official splits
are kept where a source has them; only rows without one are assigned, and a missing validation
split is cut from train.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

SPLITS = ("train", "val", "test")


def merge_groups(patient: pd.Series, pixel_hash: pd.Series) -> np.ndarray:
    """Connected components over 'same patient' and 'same pixels' (union-find); returns a group id per row."""
    n = len(patient)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for key in (patient.fillna("").astype(str).to_numpy(), pixel_hash.fillna("").astype(str).to_numpy()):
        first: dict[str, int] = {}
        for i, k in enumerate(key):
            if not k:
                continue
            if k in first:
                a, b = find(i), find(first[k])
                if a != b:
                    parent[a] = b
            else:
                first[k] = i
    return np.array([find(i) for i in range(n)])


def _stratum(labels: pd.Series) -> np.ndarray:
    """Stratify on the label string; multilabel rows stratify on their first finding ("" = none)."""
    return labels.fillna("").astype(str).str.split("|").str[0].to_numpy()


def _cut(index: np.ndarray, groups: np.ndarray, strata: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Choose about ``fraction`` of the rows in ``index`` as whole groups, stratified; returns a mask."""
    mask = np.zeros(len(index), dtype=bool)
    if fraction <= 0 or len(index) == 0:
        return mask
    n_groups = len(np.unique(groups[index]))
    n_splits = int(round(1 / fraction))
    if n_groups < 2 or n_splits < 2:
        return mask
    n_splits = min(n_splits, n_groups)
    # Strata with fewer members than folds only trigger a warning; the split stays valid.
    folder = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _, held = next(folder.split(np.zeros(len(index)), strata[index], groups[index]))
    mask[held] = True
    return mask


def assign_splits(
    manifest: pd.DataFrame,
    *,
    val: float,
    test: float,
    seed: int,
    use_official: bool = True,
    groups: np.ndarray | None = None,
) -> pd.Series:
    """Return the split of every row. ``groups`` defaults to the patient key."""
    if groups is None:
        groups = manifest["patient_key"].fillna(pd.Series(manifest.index.astype(str), index=manifest.index))
        groups = pd.factorize(groups)[0]
    strata = _stratum(manifest["label"])
    split = manifest["split"].where(manifest["split"].isin(SPLITS), None) if use_official else None
    out = pd.Series(split if split is not None else [None] * len(manifest), index=manifest.index, dtype=object)

    # A group that has an official split anywhere takes it everywhere, so no patient straddles splits.
    official = out.notna().to_numpy()
    group_split: dict[int, str] = {}
    for g, s in zip(groups[official], out[official]):
        group_split.setdefault(int(g), s)
    free = ~official & np.isin(groups, list(group_split))
    out[free] = [group_split[int(g)] for g in groups[free]]

    has_official = set(out.dropna())
    rest = np.flatnonzero(out.isna().to_numpy())
    if len(rest):
        test_frac = 0.0 if "test" in has_official else test
        mask_test = _cut(rest, groups, strata, test_frac, seed)
        out.iloc[rest[mask_test]] = "test"
        rest = rest[~mask_test]
        val_frac = 0.0 if "val" in has_official else val / max(1e-9, 1 - test_frac)
        mask_val = _cut(rest, groups, strata, val_frac, seed + 1)
        out.iloc[rest[mask_val]] = "val"
        out.iloc[rest[~mask_val]] = "train"
    # A source with an official train split but no val/test (e.g. Kermany's train folder alone):
    # cut the missing ones from train, patient-level, so evaluation still has held-out data.
    for name, frac, offset in (("test", test, 0), ("val", val, 1)):
        if name not in set(out) and frac > 0:
            train = np.flatnonzero((out == "train").to_numpy())
            share = frac / max(1e-9, 1 - (test if name == "val" and "test" not in has_official else 0))
            mask = _cut(train, groups, strata, share, seed + offset)
            out.iloc[train[mask]] = name
    return out


def leaks(manifest: pd.DataFrame, split: pd.Series, column: str) -> list[str]:
    """Values of ``column`` (patient key or pixel hash) found in more than one split."""
    frame = pd.DataFrame({"key": manifest[column], "split": split}).dropna()
    frame = frame[frame["key"].astype(str) != ""]
    per_key = frame.groupby("key")["split"].nunique()
    return sorted(per_key[per_key > 1].index.astype(str))
