"""The external test set: which files, their labels mapped onto the model's labels, and content hashes.

``--data`` is a folder (labels from sub-folder names, e.g. Kermany's NORMAL / PNEUMONIA), a manifest CSV
(the ``manifest`` source's layout), or absent, in which case the configured data source
(``-s data.source=... -s data.path=...``) builds the manifest. Every form ends as one table with the
standard manifest columns, so subgroups (view, sex, age) come along wherever the source has them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cxr.data.prepare import META_COLUMNS
from cxr.data.sources import build_source
from cxr.data.sources.base import SPLITS, SourceError, standardise
from cxr.data.sources.manifest import NEGATIVE_NAMES, POSITIVE_NAMES, SPLIT_ALIASES, find_files
from cxr.fsutil import sha256_file
from cxr.imaging import dicom_header_meta
from cxr.task import Task

if TYPE_CHECKING:
    from cxr.config import Config

IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
# Folder names that group images without being labels (Kaggle's chest_xray/test/NORMAL layout).
_NOT_LABELS = {*SPLITS, *SPLIT_ALIASES, "chest_xray", "images"}


@dataclass
class ExternalSet:
    table: pd.DataFrame  # manifest columns; ``image`` absolute, plus ``file`` (shown in reports) and ``sha256``
    description: str
    notes: list[str] = field(default_factory=list)
    name: str = "external"  # short, for MLflow: the source, or the folder or manifest the set came from

    @property
    def dataset_hash(self) -> str:
        """Content and labels, not file names: the same images under other names hash the same."""
        lines = sorted(f"{h}\t{label}" for h, label in zip(self.table["sha256"], self.table["label"]))
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def load_external_set(cfg: "Config", data: str | Path | None, task: Task | str, workdir: Path) -> ExternalSet:
    """The external set as a table; ``workdir`` receives the files of generated sources (synthetic)."""
    root: Path | None = None
    notes: list[str] = []
    if data is None:
        source_cfg = cfg.override({"data.manifest_task": str(task)}) if cfg.data.source == "manifest" else cfg
        built = build_source(source_cfg, workdir)
        table, notes = built.manifest, built.notes
        if built.files_in_raw:
            root = workdir
        elif cfg.data.path:
            given = Path(cfg.data.path).expanduser().resolve()
            root = given if given.is_dir() else given.parent
        description = f"data.source={cfg.data.source}" + (f" data.path={cfg.data.path}" if cfg.data.path else "")
        name = cfg.data.source + (f" {Path(cfg.data.path).name}" if cfg.data.path else "")
    else:
        path = Path(data).expanduser().resolve()
        if path.is_dir():
            table, root, description, name = folder_table(path), path, f"folder {path}", _folder_name(path)
        elif path.is_file():
            source_cfg = cfg.override(
                {"data.source": "manifest", "data.path": str(path), "data.manifest_task": str(task)}
            )
            built = build_source(source_cfg, workdir)
            table, notes, root, description = built.manifest, built.notes, path.parent, f"manifest {path}"
            name = path.stem
        else:
            raise SourceError(
                f"--data {path} does not exist; give a folder of images, a manifest CSV, "
                "or leave it out and set -s data.source=... -s data.path=..."
            )
    images = [Path(p) if Path(p).is_absolute() or root is None else root / p for p in table["image"]]
    images = [p.resolve() for p in images]
    table = table.assign(
        image=[str(p) for p in images],
        file=[_shown(p, root) for p in images],  # what reports show: relative to the data
        sha256=[sha256_file(p) for p in images],
    )
    return ExternalSet(with_dicom_headers(table.reset_index(drop=True)), description, list(notes), name)


def with_dicom_headers(table: pd.DataFrame) -> pd.DataFrame:
    """View, sex, age and the hashed patient key from DICOM headers where the table has none (a folder of
    DICOMs), so subgroups and patient-level calibration splits come along as with a manifest."""
    meta = [c for c in META_COLUMNS if c in table]
    todo = table.index[table["image"].str.lower().str.endswith(DICOM_SUFFIXES) & table[meta].isna().any(axis=1)]
    if len(todo) == 0:
        return table
    found = pd.DataFrame([dicom_header_meta(table.at[i, "image"]) for i in todo], index=todo, columns=meta)
    out = table.copy()
    for col in meta:
        out[col] = out[col].astype(object).where(out[col].notna(), found[col].reindex(out.index))
    out["age"] = pd.to_numeric(out["age"], errors="coerce")
    return out


def _folder_name(path: Path) -> str:
    """``chest_xray/test`` rather than ``test``: a split folder is named with the folder that holds it."""
    return f"{path.parent.name}/{path.name}" if path.name.lower() in _NOT_LABELS and path.parent.name else path.name


def folder_table(root: Path) -> pd.DataFrame:
    """Images under ``root``; each one's label is its first enclosing folder that is not a split name."""
    rows = []
    unlabelled = []
    for image in find_files(root, IMAGE_SUFFIXES):
        folders = [part for part in image.relative_to(root).parts[:-1] if part.lower() not in _NOT_LABELS]
        if not folders:
            unlabelled.append(image.name)
            continue
        rows.append({"image": str(image), "label": folders[0]})
    if unlabelled:
        raise SourceError(
            f"{len(unlabelled)} images in {root} are not in a label folder (e.g. {unlabelled[0]}); "
            "put them in sub-folders named after their label (NORMAL/, PNEUMONIA/)"
        )
    if not rows:
        raise SourceError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in label sub-folders of {root}")
    return standardise(pd.DataFrame(rows).assign(source="folder"))


def _shown(path: Path, root: Path | None) -> str:
    if root is not None and path.is_relative_to(root.resolve()):
        return path.relative_to(root.resolve()).as_posix()
    return str(path)


# --- labels ---------------------------------------------------------------------------------------


def map_labels(data_labels: list[str], model_labels: list[str], task: Task | str) -> dict[str, str]:
    """Each label name of the data -> one of the model's labels (multilabel: each finding name).

    Names match case-insensitively; for a binary model, normal/negative-like and pneumonia/positive-like
    names (the manifest source's lists) map onto the model's negative and positive label.
    """
    task, by_lower = Task(task), {m.lower(): m for m in model_labels}
    names = sorted(
        {p.strip() for lab in data_labels for p in (lab.split("|") if task.multilabel else [lab]) if p.strip()}
    )
    mapping: dict[str, str] = {}
    unknown = []
    for name in names:
        low = name.lower()
        if low in by_lower:
            mapping[name] = by_lower[low]
        elif task.binary and low in NEGATIVE_NAMES:
            mapping[name] = model_labels[0]
        elif task.binary and low in POSITIVE_NAMES:
            mapping[name] = model_labels[1]
        else:
            unknown.append(name)
    if unknown:
        raise SourceError(
            f"labels {unknown} of the external set match none of the model's labels {model_labels}; "
            "rename the folders or the CSV labels to the model's label names"
        )
    if task.binary and len(set(mapping.values())) < len(mapping):
        raise SourceError(
            f"labels {names} map onto the model's labels {model_labels} ambiguously ({mapping}); "
            "use exactly one negative and one positive label name"
        )
    return mapping


def targets(labels: pd.Series, model_labels: list[str], task: Task | str) -> np.ndarray:
    """Ground truth in the model's layout: 0/1 (binary), class index (multiclass), 0/1 matrix (multilabel)."""
    mapping = map_labels(labels.tolist(), model_labels, task)
    index = {m: i for i, m in enumerate(model_labels)}
    if Task(task).multilabel:
        y = np.zeros((len(labels), len(model_labels)), np.int64)
        for row, lab in enumerate(labels):
            for part in filter(None, (p.strip() for p in lab.split("|"))):
                y[row, index[mapping[part]]] = 1
        return y
    return np.array([index[mapping[lab.strip()]] for lab in labels], np.int64)
