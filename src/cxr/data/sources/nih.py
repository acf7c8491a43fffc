"""NIH ChestX-ray14: the ``Data_Entry_2017*.csv(.gz)`` table plus PNGs found anywhere under the path.

``nih_mode: multilabel`` keeps every finding (``|``-joined, "" for No Finding); ``first_finding``
makes a multiclass task of the first listed finding. ``train_val_list.txt`` / ``test_list.txt``,
when present, give the official patient-level split (train_val -> train; prepare cuts val).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from cxr.data.sources.base import SourceData, SourceError
from cxr.data.sources.manifest import find_files, index_files, source_path
from cxr.imaging import age_years, patient_key
from cxr.task import Task

if TYPE_CHECKING:
    from cxr.config import Config

log = logging.getLogger(__name__)

SOURCE = "nih"
# The 14 ChestX-ray14 findings in MedMNIST's (ChestMNIST) label order, NIH spelling.
NIH_FINDINGS = [
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
]
NO_FINDING = "No Finding"
COLUMNS = {
    "Image Index": "image",
    "Finding Labels": "findings",
    "Follow-up #": "follow_up",
    "Patient ID": "patient_id",
    "Patient Age": "age",
    "Patient Gender": "sex",
    "View Position": "view",
}
SPLIT_LISTS = {"train_val_list.txt": "train", "test_list.txt": "test"}
EXPECTED = "the ChestX-ray14 folder holding Data_Entry_2017*.csv and the images_*/ folders"


def classes_for(mode: str) -> list[str]:
    return list(NIH_FINDINGS) if mode == "multilabel" else [NO_FINDING, *NIH_FINDINGS]


def build(cfg: "Config", raw_dir: Path) -> SourceData:
    path = source_path(cfg, EXPECTED)
    mode = cfg.data.nih_mode
    table_path = find_table(path)
    root = path if path.is_dir() else path.parent
    df = parse_table(table_path, mode)

    files = index_files(find_files(root, (".png",)))
    found = df["image"].map(files)
    notes = []
    missing = found.isna()
    if missing.all():
        raise SourceError(f"none of the {len(df)} images listed in {table_path.name} were found under {root}")
    if missing.any():
        notes.append(f"{int(missing.sum())} of {len(df)} table rows dropped: image file not found under {root}")
    split = official_split(root)
    if split:
        df["split"] = df["image"].map(split)
    else:
        notes.append("no train_val_list.txt/test_list.txt found: no official split")
    df["image"] = found.map(lambda p: str(p) if isinstance(p, Path) else None)
    df = df[~missing].reset_index(drop=True)
    log.info("nih: %d images, %d patients", len(df), df["patient_key"].nunique())
    task = Task.MULTILABEL if mode == "multilabel" else Task.MULTICLASS
    return SourceData(df, task=task, classes=classes_for(mode), files_in_raw=False, notes=notes)


def find_table(path: Path) -> Path:
    """The Data_Entry_2017 table: ``path`` itself, next to it, or anywhere below it."""
    if path.is_file():
        return path
    for candidates in (path.glob("Data_Entry_2017*"), path.rglob("Data_Entry_2017*")):
        tables = sorted(p for p in candidates if p.name.lower().endswith((".csv", ".csv.gz")) and p.is_file())
        if tables:
            return tables[0]
    raise SourceError(f"no Data_Entry_2017*.csv or .csv.gz under {path}; point data.path at {EXPECTED}")


def parse_table(csv_path: str | Path, mode: str = "multilabel") -> pd.DataFrame:
    """The label table as manifest rows (``image`` = file name); needs no image files."""
    if mode not in ("multilabel", "first_finding"):
        raise SourceError(f"unknown nih_mode {mode!r}; use multilabel or first_finding")
    try:
        raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read the NIH table {csv_path} ({exc})") from None
    raw.columns = [c.strip() for c in raw.columns]
    missing = [c for c in COLUMNS if c not in raw.columns]
    if missing:
        raise SourceError(f"{csv_path} lacks the NIH column(s) {', '.join(missing)}")
    raw = raw[list(COLUMNS)].rename(columns=COLUMNS).apply(lambda col: col.str.strip())

    findings = [[f.strip() for f in text.split("|") if f.strip()] for text in raw["findings"].tolist()]
    _check_findings(findings, csv_path)
    return pd.DataFrame(
        {
            "image": raw["image"],
            "label": _labels(findings, mode),
            "patient_key": _patient_keys(raw["patient_id"]),
            "view": raw["view"].str.upper().where(raw["view"] != "", None),
            "age": [_age(a) for a in raw["age"].tolist()],
            "sex": raw["sex"].str.upper().str[:1].where(lambda s: s.isin(["M", "F"]), None),
            "follow_up": pd.to_numeric(raw["follow_up"], errors="coerce"),
            "source": SOURCE,
            "split": None,
        }
    )


def official_split(root: Path) -> dict[str, str]:
    """Image name -> train / test from the official list files found under ``root``."""
    split: dict[str, str] = {}
    for name, value in SPLIT_LISTS.items():
        hits = sorted(root.rglob(name))
        if hits:
            split.update({line.strip(): value for line in hits[0].read_text().splitlines() if line.strip()})
    return split


def _check_findings(findings: list[list[str]], csv_path: str | Path) -> None:
    known = {*NIH_FINDINGS, NO_FINDING}
    unknown = sorted({f for row in findings for f in row} - known)
    if unknown:
        raise SourceError(f"{csv_path}: unknown finding names {unknown}; expected {sorted(known)}")
    empty = sum(1 for row in findings if not row)
    if empty:
        raise SourceError(f"{csv_path}: {empty} rows have an empty Finding Labels (expected '{NO_FINDING}')")


def _labels(findings: list[list[str]], mode: str) -> list[str]:
    if mode == "first_finding":
        return [row[0] for row in findings]
    # Canonical (class-list) order, so equal finding sets give equal label strings.
    return ["|".join(f for f in NIH_FINDINGS if f in present) for present in map(set, findings)]


def _patient_keys(ids: pd.Series) -> list[str | None]:
    # Hash each distinct id once; "00001" and "1" are the same patient.
    normalised = ids.map(lambda i: str(int(i)) if i.isdigit() else i)
    keys = {pid: patient_key(pid, SOURCE) for pid in normalised.unique()}
    return normalised.map(keys).tolist()


def _age(text: str) -> float | None:
    """The table's age as a float (as this source always wrote it); implausible ages are unknown."""
    years = age_years(text)
    return None if years is None else float(years)
