"""The standard manifest every source produces, and what ingest writes to ``paths.raw``.

Columns (one row per image):
- ``image``: path to the image file, relative to the raw folder (or absolute when not copied)
- ``label``: class name (binary, multiclass) or ``|``-joined finding names (multilabel; "" = none)
- ``patient_key``: salted hash of the patient id (``cxr.imaging.patient_key``), never the raw id
- ``view``: PA / AP / LL / ... or empty; ``age`` in years or empty; ``sex``: M / F or empty
- ``follow_up``: follow-up number where the source has it, else empty
- ``source``: the source's name; ``split``: official split (train / val / test) or empty
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from cxr.errors import UserError
from cxr.task import Task

MANIFEST_COLUMNS = ["image", "label", "patient_key", "view", "age", "sex", "follow_up", "source", "split"]
SPLITS = ("train", "val", "test")


class SourceError(UserError):
    """The raw source is missing or malformed; the message says what to fix."""


@dataclass
class SourceData:
    manifest: pd.DataFrame
    task: Task
    classes: list[str]
    # Generated sources (synthetic, medmnist) already wrote their files under the raw folder.
    files_in_raw: bool = False
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.manifest = standardise(self.manifest)


def standardise(df: pd.DataFrame) -> pd.DataFrame:
    """Add missing optional columns, order them, and normalise empty values."""
    df = df.copy()
    for col in MANIFEST_COLUMNS:
        if col not in df.columns:
            df[col] = None
    missing_required = df["image"].isna() | df["label"].isna()
    if missing_required.any():
        raise SourceError(f"{int(missing_required.sum())} manifest rows have no image or label")
    df["label"] = df["label"].astype(str)
    df["split"] = df["split"].where(df["split"].isin(SPLITS), None)
    df["age"] = pd.to_numeric(df["age"], errors="coerce")
    df["follow_up"] = pd.to_numeric(df["follow_up"], errors="coerce")
    return df[MANIFEST_COLUMNS + [c for c in df.columns if c not in MANIFEST_COLUMNS]].reset_index(drop=True)
