"""A team's own CSV of images and labels, plus the path helpers every folder-based source shares.

The CSV needs ``path`` (or ``image``) and ``label`` (or ``labels``, ``|``-joined for multilabel);
``patient_id``, ``view``, ``age``, ``sex`` and ``split`` are optional. Relative paths are resolved
against the CSV's folder. Other columns are dropped: they might identify a patient.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from cxr.data.sources.base import SourceData, SourceError
from cxr.imaging import patient_key
from cxr.task import Task

if TYPE_CHECKING:
    from cxr.config import Config

log = logging.getLogger(__name__)

SOURCE = "manifest"
PATH_COLUMNS = ("path", "image")
LABEL_COLUMNS = ("label", "labels")
OPTIONAL_COLUMNS = ("patient_id", "view", "age", "sex", "split")
# Label names that make the positive (second) class of a binary manifest obvious without config.
POSITIVE_NAMES = {"pneumonia", "positive", "pos", "1", "abnormal", "disease", "true", "yes"}
NEGATIVE_NAMES = {"normal", "negative", "neg", "0", "no finding", "healthy", "false", "no"}
SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "dev": "val", "testing": "test"}
SEX_ALIASES = {"m": "M", "male": "M", "f": "F", "female": "F"}
# Archives unpacked on macOS carry resource-fork copies ("._x.png", "__MACOSX/") that are not images.
_IGNORED_DIRS = {"__MACOSX"}


# --- helpers shared by the folder-based sources -------------------------------------------------


def source_path(cfg: "Config", expected: str) -> Path:
    """``data.path`` as an existing path, or a SourceError saying what the source expects there."""
    if not cfg.data.path:
        raise SourceError(f"data.path is not set; point it at {expected}")
    path = Path(cfg.data.path).expanduser()
    if not path.exists():
        raise SourceError(f"data.path {path} does not exist; point it at {expected}")
    return path.resolve()


def find_files(root: Path, suffixes: Iterable[str], recursive: bool = True) -> list[Path]:
    """Files under ``root`` with one of ``suffixes`` (case-insensitive), sorted, hidden ones skipped."""
    wanted = {s.lower() for s in suffixes}
    if not root.is_dir():
        return []
    candidates = root.rglob("*") if recursive else root.iterdir()
    found = []
    for p in candidates:
        if p.suffix.lower() not in wanted:
            continue
        parts = p.relative_to(root).parts
        if any(part.startswith(".") or part in _IGNORED_DIRS for part in parts):
            continue
        if p.is_file():
            found.append(p)
    return sorted(found)


def index_files(files: Iterable[Path], by_stem: bool = False) -> dict[str, Path]:
    """File name (or stem) -> path; the first of several same-named files wins, with a warning."""
    index: dict[str, Path] = {}
    duplicates = 0
    for p in files:
        key = p.stem if by_stem else p.name
        if key in index:
            duplicates += 1
            continue
        index[key] = p
    if duplicates:
        log.warning("%d files share a name with an earlier file and were ignored", duplicates)
    return index


# --- the manifest source ------------------------------------------------------------------------


def build(cfg: "Config", raw_dir: Path) -> SourceData:
    csv_path = source_path(cfg, "a CSV with columns path (or image) and label (or labels)")
    if not csv_path.is_file():
        raise SourceError(f"data.path {csv_path} is a folder; the manifest source needs the CSV file itself")
    table = read_table(csv_path)
    task = cfg.data.manifest_task
    path_col = _pick_column(table, PATH_COLUMNS, csv_path)
    label_col = _pick_column(table, LABEL_COLUMNS, csv_path)
    notes: list[str] = []

    labels, classes = _labels(table[label_col], task, cfg.data.positive_label, csv_path)
    df = pd.DataFrame({"image": [str(_resolve(p, csv_path.parent)) for p in table[path_col]], "label": labels})
    df = df.join(_optional_columns(table, df["image"], notes))
    df["source"] = SOURCE

    dropped = [c for c in table.columns if c not in (path_col, label_col, *OPTIONAL_COLUMNS)]
    if dropped:
        notes.append(f"columns not used (dropped, they may identify patients): {', '.join(dropped)}")
    df = _drop_missing_files(df, csv_path, notes)
    log.info("manifest %s: %d images, classes %s", csv_path, len(df), classes)
    return SourceData(df, task=task, classes=classes, files_in_raw=False, notes=notes)


def read_table(csv_path: Path) -> pd.DataFrame:
    # Read everything as text so labels such as "0"/"1" and ids with leading zeros stay as written.
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SourceError(f"{csv_path} is not a readable CSV ({exc})") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    if table.empty:
        raise SourceError(f"{csv_path} has no rows")
    return table.apply(lambda col: col.str.strip())


def _pick_column(table: pd.DataFrame, names: tuple[str, ...], csv_path: Path) -> str:
    for name in names:
        if name in table.columns:
            return name
    raise SourceError(f"{csv_path} needs a column named {' or '.join(names)}; found {', '.join(table.columns)}")


def _labels(raw: pd.Series, task: Task | str, positive: str | None, csv_path: Path) -> tuple[list[str], list[str]]:
    task = Task(task)
    if task.multilabel:
        return _multilabel(raw)
    empty = int((raw == "").sum())
    if empty:
        raise SourceError(f"{csv_path}: {empty} rows have an empty label ({task} needs one label per image)")
    if raw.str.contains("|", regex=False).any():
        raise SourceError(f"{csv_path}: labels contain '|' but data.manifest_task is {task}; use multilabel")
    names = sorted(raw.unique())
    if task.binary:
        names = binary_classes(names, positive, str(csv_path))
    return raw.tolist(), names


def _multilabel(raw: pd.Series) -> tuple[list[str], list[str]]:
    parts = [[p.strip() for p in text.split("|") if p.strip()] for text in raw]
    classes = sorted({p for row in parts for p in row})
    order = {c: i for i, c in enumerate(classes)}
    # One canonical order per label set, so equal sets compare equal as strings.
    labels = ["|".join(sorted(set(row), key=order.__getitem__)) for row in parts]
    return labels, classes


def binary_classes(names: list[str], positive: str | None, where: str) -> list[str]:
    """The two label names as [negative, positive]."""
    if len(names) != 2:
        raise SourceError(f"{where}: a binary task needs exactly 2 labels, found {len(names)}: {names}")
    if positive is not None:
        if positive not in names:
            raise SourceError(f"{where}: data.positive_label {positive!r} is not one of the labels {names}")
    else:
        positive = _guess_positive(names, where)
    return [n for n in names if n != positive] + [positive]


def _guess_positive(names: list[str], where: str) -> str:
    lowered = [n.lower() for n in names]
    pos = [n for n, low in zip(names, lowered) if low in POSITIVE_NAMES]
    neg = [n for n, low in zip(names, lowered) if low in NEGATIVE_NAMES]
    if len(pos) == 1:
        return pos[0]
    if len(neg) == 1:
        return next(n for n in names if n != neg[0])
    raise SourceError(f"{where}: cannot tell which of {names} is the positive class; set data.positive_label")


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _optional_columns(table: pd.DataFrame, images: pd.Series, notes: list[str]) -> pd.DataFrame:
    out = pd.DataFrame(index=table.index)
    if "patient_id" in table.columns:
        ids = table["patient_id"].where(table["patient_id"] != "", None)
    else:
        ids = pd.Series([None] * len(table), index=table.index)
    missing = ids.isna()
    if missing.any():
        # Without an id the image can only be its own patient, which a split cannot keep together.
        notes.append(f"{int(missing.sum())} images have no patient_id; each is treated as its own patient")
        ids = ids.where(~missing, images)
    out["patient_key"] = [patient_key(i, SOURCE) for i in ids]
    out["view"] = _column(table, "view").str.upper()
    out["age"] = pd.to_numeric(_column(table, "age"), errors="coerce")
    out["sex"] = _column(table, "sex").str.lower().map(SEX_ALIASES)
    split = _column(table, "split").str.lower()
    out["split"] = split.replace(SPLIT_ALIASES)
    return out.where(out != "", None)


def _column(table: pd.DataFrame, name: str) -> pd.Series:
    if name in table.columns:
        return table[name]
    return pd.Series([""] * len(table), index=table.index, dtype=str)


def _drop_missing_files(df: pd.DataFrame, csv_path: Path, notes: list[str]) -> pd.DataFrame:
    exists = df["image"].map(lambda p: Path(p).is_file())
    if not exists.any():
        raise SourceError(
            f"none of the {len(df)} image paths in {csv_path} exist "
            f"(relative paths are resolved against {csv_path.parent})"
        )
    if not exists.all():
        notes.append(f"{int((~exists).sum())} of {len(df)} rows dropped: image file not found")
    return df[exists].reset_index(drop=True)
