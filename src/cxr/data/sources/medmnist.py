"""PneumoniaMNIST (binary) and ChestMNIST (14 NIH findings, multilabel) from the MedMNIST ``.npz``.

``data.path`` is the ``.npz`` or a folder holding ``{flavor}.npz``; without one the official file is
downloaded from Zenodo (md5-checked) into ``raw_dir/_download``. Every image is written as an 8-bit
grayscale PNG under ``raw_dir/images`` and the official split is kept. MedMNIST has no patient ids.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import shutil
import urllib.request
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image

from cxr.data.sources.base import SPLITS, SourceData, SourceError
from cxr.data.sources.kermany import PNEUMONIA_CLASSES
from cxr.data.sources.nih import NIH_FINDINGS
from cxr.imaging import patient_key
from cxr.task import Task

if TYPE_CHECKING:
    from cxr.config import Config

log = logging.getLogger(__name__)

SOURCE = "medmnist"
ZENODO_FILES = "https://zenodo.org/records/10519652/files"
# Checksums published by the medmnist package (INFO[flavor]["MD5"]); only the 28 px files are listed.
MD5 = {
    ("pneumoniamnist", 28): "28209eda62fecd6e6a2d98b1501bb15f",
    ("chestmnist", 28): "02c8a6516a18b556561a56cbdd36c4a8",
}
FLAVORS = {
    "pneumoniamnist": (Task.BINARY, PNEUMONIA_CLASSES),
    "chestmnist": (Task.MULTILABEL, NIH_FINDINGS),
}
IMAGE_DIR = "images"
DOWNLOAD_DIR = "_download"
DOWNLOAD_TIMEOUT_S = 60


def file_name(flavor: str, size: int) -> str:
    return f"{flavor}.npz" if size == 28 else f"{flavor}_{size}.npz"


def download_url(flavor: str, size: int) -> str:
    return f"{ZENODO_FILES}/{file_name(flavor, size)}?download=1"


def build(cfg: "Config", raw_dir: Path) -> SourceData:
    flavor, size = cfg.data.medmnist_flavor, cfg.data.medmnist_size
    if flavor not in FLAVORS:
        raise SourceError(f"unknown medmnist_flavor {flavor!r}; choose one of {', '.join(FLAVORS)}")
    task, classes = FLAVORS[flavor]
    npz = locate(cfg.data.path, flavor, size, Path(raw_dir))
    raw_dir = Path(raw_dir)
    (raw_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)

    frames = []
    with _open_npz(npz) as data:
        splits = [s for s in SPLITS if f"{s}_images" in data.files]
        if not splits:
            raise SourceError(f"{npz} has none of the keys {', '.join(s + '_images' for s in SPLITS)}")
        for split in splits:
            images, labels = data[f"{split}_images"], _split_labels(data, split, npz)
            frames.append(_export_split(images, _label_names(labels, task, classes, npz), split, raw_dir))
    df = pd.concat(frames, ignore_index=True)
    log.info("medmnist %s: %d images exported to %s", flavor, len(df), raw_dir / IMAGE_DIR)
    return SourceData(df, task=task, classes=list(classes), files_in_raw=True, notes=_notes(flavor))


def locate(path: str | None, flavor: str, size: int, raw_dir: Path) -> Path:
    """The local ``.npz`` (data.path, a folder holding it, or an earlier download), else download it."""
    name = file_name(flavor, size)
    if path:
        given = Path(path).expanduser()
        candidate = given / name if given.is_dir() else given
        if candidate.is_file():
            return candidate
        log.warning("%s not found; downloading %s instead", candidate, name)
    cached = raw_dir / DOWNLOAD_DIR / name
    if cached.is_file():  # only a verified download is ever renamed to this name
        return cached
    return download(flavor, size, cached)


def download(flavor: str, size: int, dest: Path) -> Path:
    """Fetch the official file to ``dest``, keeping it only when its md5 matches."""
    url = download_url(flavor, size)
    expected = MD5.get((flavor, size))
    if expected is None:
        raise SourceError(
            f"no checksum is known for {file_name(flavor, size)}; download it from {url} and set data.path to it"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    log.info("downloading %s", url)
    try:
        _fetch(url, partial)
    except (OSError, http.client.HTTPException) as exc:
        partial.unlink(missing_ok=True)
        raise SourceError(
            f"could not download {url} ({exc}); download it by hand and put it at {dest} "
            f"(or set data.path to the .npz or its folder)"
        ) from None
    actual = md5sum(partial)
    if actual != expected:
        partial.unlink(missing_ok=True)
        raise SourceError(f"download of {url} has md5 {actual}, expected {expected}; try again later")
    partial.replace(dest)
    return dest


def _fetch(url: str, dest: Path) -> None:
    """The only network call (tests replace it)."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, dest.open("wb") as out:
        shutil.copyfileobj(response, out)


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _open_npz(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise SourceError(f"{path} is not a readable MedMNIST .npz ({exc})") from None


def _split_labels(data, split: str, npz: Path) -> np.ndarray:
    key = f"{split}_labels"
    if key not in data.files:
        raise SourceError(f"{npz} has {split}_images but no {key}")
    labels = np.asarray(data[key])
    if len(labels) != len(data[f"{split}_images"]):
        raise SourceError(f"{npz}: {key} has {len(labels)} rows for {len(data[f'{split}_images'])} images")
    return labels.reshape(len(labels), -1)


def _label_names(labels: np.ndarray, task: Task, classes: list[str], npz: Path) -> list[str]:
    if task.binary:
        if labels.shape[1] != 1 or not np.isin(labels, (0, 1)).all():
            raise SourceError(f"{npz}: expected one 0/1 label per image, got shape {labels.shape}")
        return [classes[int(v)] for v in labels[:, 0]]
    if labels.shape[1] != len(classes) or not np.isin(labels, (0, 1)).all():
        raise SourceError(f"{npz}: expected {len(classes)} 0/1 labels per image, got shape {labels.shape}")
    return ["|".join(c for c, on in zip(classes, row) if on) for row in labels]


def _export_split(images: np.ndarray, labels: list[str], split: str, raw_dir: Path) -> pd.DataFrame:
    rows = []
    for index, (pixels, label) in enumerate(zip(images, labels)):
        rel = f"{IMAGE_DIR}/{split}_{index:05d}.png"
        _to_gray(pixels).save(raw_dir / rel)
        # No patient ids exist: the split and index are the only identity an image has.
        rows.append({"image": rel, "label": label, "patient_key": patient_key(f"{split}-{index}", SOURCE)})
    df = pd.DataFrame(rows, columns=["image", "label", "patient_key"])
    df["source"] = SOURCE
    df["split"] = split
    return df


def _to_gray(pixels: np.ndarray) -> Image.Image:
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3):  # the colour MedMNIST sets are (H, W, 3)
        return Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).convert("L")
    if arr.ndim != 2:
        raise SourceError(f"MedMNIST image has shape {arr.shape}; expected (H, W) or (H, W, 3)")
    return Image.fromarray(arr)


def _notes(flavor: str) -> list[str]:
    notes = [
        "MedMNIST has no patient ids: each image is its own patient key (split and index), "
        "so keep the official split (prepare.split.use_official) to avoid patient leakage"
    ]
    if flavor == "pneumoniamnist":
        notes.append("PneumoniaMNIST is the Kermany set at 28 px: never score a PneumoniaMNIST model on Kermany images")
    return notes
