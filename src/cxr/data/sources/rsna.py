"""RSNA Pneumonia Detection Challenge: ``stage_2_train_labels.csv`` (or a .zip of it) plus DICOMs.

The CSV has one row per box (patientId, x, y, width, height, Target); an image is pneumonia when any
of its rows has Target 1. DICOMs ``{patientId}.dcm`` are looked for in ``stage_2_train_images/``,
else anywhere under the path. View, age and sex are left to prepare, which reads the DICOM header.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from cxr.data.sources.base import SourceData, SourceError
from cxr.data.sources.kermany import PNEUMONIA_CLASSES
from cxr.data.sources.manifest import find_files, index_files, source_path
from cxr.imaging import patient_key
from cxr.task import Task

if TYPE_CHECKING:
    from cxr.config import Config

log = logging.getLogger(__name__)

SOURCE = "rsna"
LABELS_NAME = "stage_2_train_labels.csv"
IMAGES_DIR = "stage_2_train_images"
REQUIRED = ("patientId", "Target")
EXPECTED = f"the RSNA folder holding {LABELS_NAME} (or a .zip of it) and {IMAGES_DIR}/"


def build(cfg: "Config", raw_dir: Path) -> SourceData:
    path = source_path(cfg, EXPECTED)
    labels_path = find_labels(path)
    root = path if path.is_dir() else path.parent
    labels = parse_labels(labels_path)

    image_root = root / IMAGES_DIR if (root / IMAGES_DIR).is_dir() else root
    dicoms = index_files(find_files(image_root, (".dcm",)), by_stem=True)
    found = labels["patientId"].map(dicoms)
    missing = found.isna()
    if missing.all():
        raise SourceError(
            f"none of the {len(labels)} labelled patients has a DICOM ({{patientId}}.dcm) under {image_root}"
        )
    notes = [
        # RSNA re-issued ids per image, so images of one real patient cannot be kept together.
        "RSNA patientId names one image: each image is its own patient key"
    ]
    if missing.any():
        dropped = int(missing.sum())
        notes.append(f"{dropped} of {len(labels)} labelled patients dropped: no DICOM under {image_root}")
    labels = labels[~missing]
    df = pd.DataFrame(
        {
            "image": found[~missing].map(str),
            "label": labels["label"],
            "patient_key": labels["patientId"].map(lambda pid: patient_key(pid, SOURCE)),
            "source": SOURCE,
            "boxes": labels["boxes"],
        }
    )
    log.info("rsna: %d images, %d pneumonia", len(df), int((df["label"] == "pneumonia").sum()))
    return SourceData(df, task=Task.BINARY, classes=list(PNEUMONIA_CLASSES), files_in_raw=False, notes=notes)


def find_labels(path: Path) -> Path:
    """The labels CSV or zip: ``path`` itself, the standard name, or a file whose name contains it."""
    if path.is_file():
        return path
    if (path / LABELS_NAME).is_file():
        return path / LABELS_NAME
    stem = LABELS_NAME.removesuffix(".csv")
    for suffix in (".csv", ".zip"):
        hits = sorted(p for p in path.glob(f"*{stem}*{suffix}") if p.is_file())
        if hits:
            return hits[0]
    raise SourceError(f"no {LABELS_NAME} (or .zip of it) in {path}; point data.path at {EXPECTED}")


def parse_labels(src: Path) -> pd.DataFrame:
    """One row per patientId: label (normal / pneumonia) and the number of pneumonia boxes."""
    table = _read_csv(Path(src))
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        raise SourceError(f"{src} lacks column(s) {', '.join(missing)}; is it {LABELS_NAME}?")
    target = pd.to_numeric(table["Target"], errors="coerce")
    bad = ~target.isin([0, 1])
    if bad.any():
        raise SourceError(f"{src}: {int(bad.sum())} rows have a Target other than 0 or 1")
    per_patient = (
        pd.DataFrame({"patientId": table["patientId"].astype(str).str.strip(), "target": target.astype(int)})
        .groupby("patientId", sort=True)["target"]
        .agg(positive="max", boxes="sum")
        .reset_index()
    )
    per_patient["label"] = [PNEUMONIA_CLASSES[v] for v in per_patient["positive"]]
    return per_patient[["patientId", "label", "boxes"]]


def _read_csv(src: Path) -> pd.DataFrame:
    try:
        if zipfile.is_zipfile(src):
            return _read_zipped(src)
        return pd.read_csv(src)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read the RSNA labels {src} ({exc})") from None


def _read_zipped(src: Path) -> pd.DataFrame:
    with zipfile.ZipFile(src) as zf:
        csvs = [n for n in zf.namelist() if n.lower().endswith(".csv") and not n.startswith("__MACOSX")]
        named = [n for n in csvs if Path(n).name == LABELS_NAME]
        if not named and len(csvs) != 1:
            raise SourceError(f"{src} holds {len(csvs)} CSV files and none is named {LABELS_NAME}")
        with zf.open((named or csvs)[0]) as fh:
            return pd.read_csv(fh)
