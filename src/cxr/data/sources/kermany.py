"""Kermany "Chest X-Ray Images (Pneumonia)" in the Kaggle layout.

``<path>/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`` (``<path>`` may also be the folder
holding the split folders, or a folder holding NORMAL/PNEUMONIA directly). The split folders that
exist are kept as ``split``. Patient ids come from the file names, because several images can
belong to one patient and a split must keep them together.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from cxr.data.sources.base import SPLITS, SourceData, SourceError
from cxr.data.sources.manifest import find_files, source_path
from cxr.imaging import patient_key
from cxr.task import Task

if TYPE_CHECKING:
    from cxr.config import Config

log = logging.getLogger(__name__)

SOURCE = "kermany"
# Shared by every normal-vs-pneumonia source; the negative class comes first.
PNEUMONIA_CLASSES = ["normal", "pneumonia"]
CLASS_FOLDERS = {"normal": "normal", "pneumonia": "pneumonia"}  # folder name (lower case) -> class
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
# person1000_bacteria_2931.jpeg -> person1000 (bacteria); one file also has a trailing _N.
_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)_\d+", re.IGNORECASE)
# IM-0115-0001.jpeg -> IM-0115, NORMAL2-IM-0246-0001(-0002).jpeg -> NORMAL2-IM-0246
_IM = re.compile(r"^((?:NORMAL\d+-)?IM-\d+)-\d+", re.IGNORECASE)
EXPECTED = "the Kermany chest_xray folder (train/val/test folders holding NORMAL and PNEUMONIA)"


def kermany_patient_id(file_name: str) -> str | None:
    """The patient id encoded in a Kermany file name, or None when the name has no known pattern."""
    stem = Path(file_name).stem
    match = _PERSON.match(stem) or _IM.match(stem)
    return match.group(1) if match else None


def pneumonia_subtype(file_name: str) -> str | None:
    """bacteria / virus from a pneumonia file name, None when the name does not say."""
    match = _PERSON.match(Path(file_name).stem)
    return match.group(2).lower() if match else None


def build(cfg: "Config", raw_dir: Path) -> SourceData:
    path = source_path(cfg, EXPECTED)
    root = dataset_root(path)
    rows = []
    for split, label, folder in class_folders(root):
        for image in find_files(folder, IMAGE_SUFFIXES, recursive=False):
            rows.append(_row(image, label, split))
    if not rows:
        raise SourceError(f"no images found under {path}; expected {EXPECTED}")
    df = pd.DataFrame(rows)
    notes = []
    fallback = df.pop("id_from_name")
    if (~fallback).any():
        notes.append(
            f"{int((~fallback).sum())} file names have no Kermany patient id; each is treated as its own patient"
        )
    log.info("kermany: %d images, %s", len(df), df.groupby(["split", "label"], dropna=False).size().to_dict())
    return SourceData(df, task=Task.BINARY, classes=list(PNEUMONIA_CLASSES), files_in_raw=False, notes=notes)


def dataset_root(path: Path) -> Path:
    """The folder holding the split (or class) folders; Kaggle's archive nests chest_xray/chest_xray."""
    root = path
    while not _has_any(root, SPLITS) and not _has_any(root, CLASS_FOLDERS) and (root / "chest_xray").is_dir():
        root = root / "chest_xray"
    return root


def class_folders(root: Path) -> list[tuple[str | None, str, Path]]:
    """(split, class, folder) for every class folder; split is None when there are no split folders."""
    splits = [s for s in SPLITS if _has_any(root, (s,))]
    parents = [(s, _subfolders(root)[s]) for s in splits] or [(None, root)]
    found = []
    for split, parent in parents:
        for name, folder in _subfolders(parent).items():
            if name in CLASS_FOLDERS:
                found.append((split, CLASS_FOLDERS[name], folder))
    return found


def _row(image: Path, label: str, split: str | None) -> dict:
    pid = kermany_patient_id(image.name)
    subtype = "normal" if label == "normal" else pneumonia_subtype(image.name)
    return {
        "image": str(image),
        "label": label,
        # A file without a parsable id can only be its own patient.
        "patient_key": patient_key(pid or f"file:{split}/{image.name}", SOURCE),
        "id_from_name": pid is not None,
        "source": SOURCE,
        "split": split,
        "subtype": subtype,
    }


def _subfolders(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_dir()}


def _has_any(folder: Path, names) -> bool:
    return any(name in _subfolders(folder) for name in names)
