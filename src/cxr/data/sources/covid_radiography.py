"""COVID-19 Radiography Database: ``<path>/{COVID,Lung_Opacity,Normal,Viral Pneumonia}/images/*.png``.

Images may also sit directly in the class folder; ``masks/`` is ignored. The database has no
patient ids. ``data.covid_balance`` downsamples every class to the smallest one (seeded).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from cxr.data.sources.base import SourceData, SourceError
from cxr.data.sources.manifest import find_files, source_path
from cxr.imaging import patient_key
from cxr.task import Task

if TYPE_CHECKING:
    from cxr.config import Config

log = logging.getLogger(__name__)

SOURCE = "covid_radiography"
CLASSES = ["covid", "lung_opacity", "normal", "viral_pneumonia"]
# Normalised folder name -> class; older releases named the COVID folder "COVID-19".
FOLDER_CLASSES = {"covid": "covid", "covid_19": "covid", **{c: c for c in CLASSES[1:]}}
ARCHIVE_FOLDER = "COVID-19_Radiography_Dataset"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
EXPECTED = "the COVID-19_Radiography_Dataset folder (COVID, Lung_Opacity, Normal, Viral Pneumonia)"


def build(cfg: "Config", raw_dir: Path) -> SourceData:
    path = source_path(cfg, EXPECTED)
    folders = class_folders(path)
    rows = []
    for label, folder in folders.items():
        image_dir = folder / "images" if (folder / "images").is_dir() else folder
        for image in find_files(image_dir, IMAGE_SUFFIXES, recursive=False):
            # No patient ids: the file is the only identity an image has.
            key = patient_key(f"{label}/{image.name}", SOURCE)
            rows.append({"image": str(image), "label": label, "patient_key": key, "source": SOURCE})
    df = pd.DataFrame(rows, columns=["image", "label", "patient_key", "source"])
    counts = df["label"].value_counts().reindex(CLASSES, fill_value=0)
    empty = counts[counts == 0].index.tolist()
    if empty:
        raise SourceError(f"no images for class(es) {', '.join(empty)} under {path}")
    notes = [
        "the database has no patient ids: each image is its own patient key, "
        "so a patient's images may fall in different splits"
    ]
    if cfg.data.covid_balance:
        df = balance(df, cfg.project.seed)
        notes.append(f"covid_balance: each class downsampled to {counts.min()} images (from {counts.to_dict()})")
    log.info("covid_radiography: %s", df["label"].value_counts().to_dict())
    return SourceData(df, task=Task.MULTICLASS, classes=list(CLASSES), files_in_raw=False, notes=notes)


def class_folders(path: Path) -> dict[str, Path]:
    """Class -> folder; also accepts the folder that holds the unpacked Kaggle archive."""
    root = path / ARCHIVE_FOLDER if (path / ARCHIVE_FOLDER).is_dir() else path
    if not root.is_dir():
        raise SourceError(f"data.path {path} is not a folder; point it at {EXPECTED}")
    folders: dict[str, Path] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        label = FOLDER_CLASSES.get(folder.name.lower().replace(" ", "_").replace("-", "_"))
        if label and label not in folders:
            folders[label] = folder
    missing = [c for c in CLASSES if c not in folders]
    if missing:
        raise SourceError(f"class folder(s) for {', '.join(missing)} not found in {root}; expected {EXPECTED}")
    return {c: folders[c] for c in CLASSES}


def balance(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Every class cut to the smallest class's count; the same seed picks the same images."""
    n = int(df["label"].value_counts().min())
    picked = [group.sample(n=n, random_state=seed) for _, group in df.groupby("label", sort=True)]
    return pd.concat(picked).sort_values("image").reset_index(drop=True)
