"""prepare: raw manifest + images -> memory-mappable uint8 arrays, a prepared manifest and a dataset card.

Each image is decoded once (in parallel), passed through the single preprocessing function at every
configured size, and written to ``images_<size>.npy`` (row i = row i of ``manifest.csv``). Splits
are made after decoding so that identical pixels filed under different patients land together.
The output folder appears whole or not at all.

Memory stays flat as the dataset grows: decoded rows go straight into the memory-mapped .npy file, a
window of ``CHUNK_ROWS`` rows at a time, and only small per-image metadata (hashes, header fields) is
kept until the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cxr import __version__
from cxr.data.split import assign_splits, leaks, merge_groups
from cxr.errors import UserError
from cxr.fsutil import atomic_dir
from cxr.imaging import ImageReadError, ReadLimits, read_image
from cxr.preprocess import PreprocessSpec, preprocess
from cxr.progress import progress_bar
from cxr.task import Task

if TYPE_CHECKING:
    from cxr.config import Config

log = logging.getLogger(__name__)
META_COLUMNS = ("view", "sex", "age", "patient_key")
EXTRA_COLUMNS = ("format", "photometric", "modality", "body_part")
RECORD_COLUMNS = ("file_sha", "pixel_hash", *META_COLUMNS, *EXTRA_COLUMNS)
FEW_VALUES = ("view", "sex", "format", "photometric", "modality", "body_part")  # kept as one shared copy each
CHUNK_ROWS = 1024  # rows mapped at once per size: bounds the pages a writer holds (1024 x 224 px = 51 MB)
DECODE_CHUNKSIZE = 16  # images a pool worker takes at a time


class PrepareError(UserError):
    """prepare cannot produce a trustworthy dataset (too many failures, no images, bad raw folder)."""


@dataclass(frozen=True)
class _Job:
    sizes: tuple[int, ...]
    resize: str
    clip: tuple[float, float]
    limits: ReadLimits


def array_path(prepared: Path, size: int) -> Path:
    return Path(prepared) / f"images_{size}.npy"


def load_card(prepared: Path) -> dict[str, Any]:
    path = Path(prepared) / "card.json"
    if not path.exists():
        raise UserError(f"no prepared dataset at {prepared}: run `cxr prepare` (or `dvc repro prepare`) first")
    return json.loads(path.read_text())


def _decode(args: tuple[int, str, _Job]) -> tuple[int, dict[str, Any]]:
    """Worker: read bytes once, hash them, decode, preprocess at every size."""
    index, path, job = args
    try:
        data = Path(path).read_bytes()
        image = read_image(data, job.limits, name=Path(path).name)
    except (ImageReadError, OSError) as exc:
        return index, {"error": str(exc)}
    arrays = {}
    for size in job.sizes:
        spec = PreprocessSpec(size=size, resize=job.resize, clip_percentiles=job.clip)  # type: ignore[arg-type]
        arrays[size] = preprocess(image, spec)
    pixels = np.ascontiguousarray(image.pixels)
    return index, {
        "arrays": arrays,
        "file_sha": hashlib.sha256(data).hexdigest(),
        "pixel_hash": hashlib.sha1(pixels.tobytes() + str(pixels.shape).encode()).hexdigest(),
        **{k: image.meta.get(k) for k in META_COLUMNS + EXTRA_COLUMNS},
    }


def prepare(cfg: "Config") -> dict[str, Any]:
    """Run the stage; returns the dataset card."""
    raw, out = Path(cfg.paths.raw), Path(cfg.paths.prepared)
    manifest, info = _read_raw(raw)
    paths = [str(p if Path(p).is_absolute() else raw / p) for p in manifest["image"]]
    job = _Job(
        sizes=tuple(cfg.prepare.sizes),
        resize=cfg.prepare.resize,
        clip=tuple(cfg.prepare.clip_percentiles),  # type: ignore[arg-type]
        limits=ReadLimits(cfg.imaging.min_side, cfg.imaging.max_pixels, cfg.imaging.max_bytes),
    )
    n = len(manifest)
    with atomic_dir(out) as tmp:
        # room for every image; a rejected one is never appended and close() trims the file: one pass, no copy
        writers = {s: RowWriter(array_path(tmp, s), n, s) for s in job.sizes}
        records = _decode_all(paths, job, writers, cfg.prepare.workers)
        errors = records.errors
        if len(errors) > cfg.prepare.max_failure_fraction * n or len(errors) == n:
            examples = "; ".join(list(errors.values())[:3])
            raise PrepareError(
                f"{len(errors)} of {n} images could not be read, above prepare.max_failure_fraction="
                f"{cfg.prepare.max_failure_fraction}; nothing was written. First errors: {examples}"
            )
        for writer in writers.values():
            writer.close()
        ok = np.array(sorted(set(range(n)) - set(errors)), dtype=np.int64)
        prepared = _prepared_manifest(manifest, records, ok)
        groups = merge_groups(prepared["patient_key"], prepared["pixel_hash"])
        prepared["split"] = assign_splits(
            prepared,
            val=cfg.prepare.split.val,
            test=cfg.prepare.split.test,
            seed=cfg.project.seed,
            use_official=cfg.prepare.split.use_official,
            groups=groups,
        ).to_numpy()
        prepared.to_csv(tmp / "manifest.csv", index=False)
        card = _card(cfg, info, prepared, errors, manifest, records, tmp)
        (tmp / "card.json").write_text(json.dumps(card, indent=2, allow_nan=False) + "\n")
    return card


def _read_raw(raw: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    if not (raw / "manifest.csv").exists() or not (raw / "source.json").exists():
        raise PrepareError(f"{raw} has no manifest.csv/source.json: run `cxr ingest` (or `dvc repro ingest`) first")
    manifest = pd.read_csv(
        raw / "manifest.csv",
        dtype={"label": str, "patient_key": str},
        keep_default_na=False,
        na_values={"age": [""], "follow_up": [""]},
    )
    if manifest.empty:
        raise PrepareError(f"{raw}/manifest.csv lists no images")
    for col in ("view", "sex", "patient_key", "split"):
        manifest[col] = manifest[col].replace("", None)
    return manifest, json.loads((raw / "source.json").read_text())


class RowWriter:
    """Appends (size, size) uint8 rows to an .npy file through a memory-mapped window of CHUNK_ROWS rows.

    Rejected images are simply not appended: the file is created for every image, and ``close`` rewrites
    the header's row count and truncates the unused tail. numpy pads a header so that its first dimension
    can grow (up to 21 digits) without changing its length, so the data never moves and the file is the
    same bytes as ``np.save`` of the kept rows.
    """

    def __init__(self, path: Path, capacity: int, size: int) -> None:
        self.path, self.capacity, self.size, self.rows = Path(path), capacity, size, 0
        created = np.lib.format.open_memmap(self.path, "w+", np.uint8, (capacity, size, size))
        self.offset = created.offset
        del created
        self._window: np.memmap | None = None
        self._used = 0

    def append(self, row: np.ndarray) -> None:
        window = self._window
        if window is None or self._used == len(window):
            window = self._open_window()
        window[self._used] = row
        self._used += 1
        self.rows += 1

    def _open_window(self) -> np.memmap:
        # dropping the written window unmaps it: its pages leave this process's RSS (the page cache keeps them)
        self._window = None
        shape = (min(CHUNK_ROWS, self.capacity - self.rows), self.size, self.size)
        offset = self.offset + self.rows * self.size * self.size
        self._window = np.memmap(self.path, np.uint8, "r+", offset=offset, shape=shape)
        self._used = 0
        return self._window

    def close(self) -> None:
        self._window = None
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
        with open(self.path, "r+b") as fh:
            np.lib.format.write_array_header_1_0(fh, {**header, "shape": (self.rows, self.size, self.size)})
            if fh.tell() != self.offset:
                raise RuntimeError(f"{self.path}: the rewritten .npy header changed length")
            fh.truncate(self.offset + self.rows * self.size * self.size)


class Records:
    """Each image's small metadata (hashes, header fields), one list per column: no pixels, no dict per image."""

    def __init__(self, n: int) -> None:
        self.columns: dict[str, list[Any]] = {c: [None] * n for c in RECORD_COLUMNS}
        self.errors: dict[int, str] = {}
        self._shared: dict[str, str] = {}

    def add(self, index: int, result: dict[str, Any]) -> None:
        if "error" in result:
            self.errors[index] = result["error"]
            return
        for col in RECORD_COLUMNS:
            value = result[col]
            if col in FEW_VALUES and isinstance(value, str):
                value = self._shared.setdefault(value, value)
            self.columns[col][index] = value

    def frame(self, rows: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame({c: [values[int(i)] for i in rows] for c, values in self.columns.items()})


def _decode_all(paths: list[str], job: _Job, writers: dict[int, RowWriter], workers: int) -> Records:
    """Decode every image in order, append its rows to the writers; returns each image's small metadata."""
    records = Records(len(paths))
    tasks = ((i, p, job) for i, p in enumerate(paths))

    def keep(i: int, r: dict) -> None:
        for s, a in r.pop("arrays", {}).items():
            writers[s].append(a)
        records.add(i, r)

    with progress_bar("prepare: decoding", total=len(paths)) as advance:
        if workers <= 1 or len(paths) < 64:
            for t in tasks:
                keep(*_decode(t))
                advance()
        else:
            # fork: workers inherit imported modules instead of re-importing them.
            # imap (ordered): row k of each array is the k-th readable image, so the manifest lines up
            with mp.get_context("fork").Pool(workers) as pool:
                for i, r in pool.imap(_decode, tasks, chunksize=DECODE_CHUNKSIZE):
                    keep(i, r)
                    advance()
    return records


def _prepared_manifest(manifest: pd.DataFrame, records: Records, ok: np.ndarray) -> pd.DataFrame:
    """Header metadata fills what the source left empty (RSNA view/sex/age live only in the DICOM)."""
    rows = manifest.iloc[ok].reset_index(drop=True).copy()
    meta = records.frame(ok)
    for col in META_COLUMNS:
        rows[col] = rows[col].where(rows[col].notna(), meta[col]) if col in rows else meta[col]
    for col in EXTRA_COLUMNS:
        rows[col] = meta[col]
    rows["pixel_hash"] = meta["pixel_hash"]
    rows["file_sha"] = meta["file_sha"]
    if "origin" in rows:  # the source's own file name stays in data/raw only
        rows = rows.drop(columns=["origin"])
    return rows


def _counts(prepared: pd.DataFrame, task: Task | str, classes: list[str]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for split, part in prepared.groupby("split"):
        if Task(task).multilabel:
            findings = part["label"].fillna("").str.split("|")
            counts[split] = {c: int(findings.apply(lambda f, c=c: c in f).sum()) for c in classes}
            counts[split]["(none)"] = int((part["label"].fillna("") == "").sum())
        else:
            vc = part["label"].value_counts()
            counts[split] = {c: int(vc.get(c, 0)) for c in classes}
    return counts


def _card(cfg, info, prepared, errors, manifest, records: Records, tmp: Path) -> dict[str, Any]:
    split = prepared["split"]
    dup_cross = leaks(prepared, split, "pixel_hash")
    dup_within = int(prepared.duplicated("pixel_hash", keep=False).sum())
    patient_leaks = leaks(prepared, split, "patient_key")
    input_hash = hashlib.sha256()
    for label, sha in zip(manifest["label"].tolist(), records.columns["file_sha"], strict=True):
        input_hash.update(f"{label}|{sha or 'ERR'}\n".encode())
    dataset_hash = hashlib.sha256((tmp / "manifest.csv").read_bytes())
    for s in cfg.prepare.sizes:
        with open(array_path(tmp, s), "rb") as fh:
            while block := fh.read(1 << 22):
                dataset_hash.update(block)
    return {
        "source": info["source"],
        "synthetic": bool(info.get("synthetic")),
        "task": info["task"],
        "classes": info["classes"],
        "sizes": list(cfg.prepare.sizes),
        "preprocess": {"resize": cfg.prepare.resize, "clip_percentiles": list(cfg.prepare.clip_percentiles)},
        "read_limits": {
            "min_side": cfg.imaging.min_side,
            "max_pixels": cfg.imaging.max_pixels,
            "max_bytes": cfg.imaging.max_bytes,
        },
        "n_images": int(len(prepared)),
        "n_rejected": len(errors),
        "counts": _counts(prepared, info["task"], info["classes"]),
        "patients": {s: int(p["patient_key"].nunique()) for s, p in prepared.groupby("split")},
        "images_per_split": {s: int(len(p)) for s, p in prepared.groupby("split")},
        "rejected": [{"image": str(manifest["image"].iloc[i]), "reason": r} for i, r in sorted(errors.items())],
        "duplicates": {
            "images_with_identical_pixels": dup_within,
            "groups_across_splits": len(dup_cross),
            "across_splits": dup_cross[:50],
        },
        "patients_in_two_splits": len(patient_leaks),
        "split": cfg.prepare.split.model_dump(),
        "seed": cfg.project.seed,
        "input_hash": input_hash.hexdigest(),
        "dataset_hash": dataset_hash.hexdigest(),
        "notes": info.get("notes", []),
        "cxr_version": __version__,
    }
