"""prepare: raw manifest + images -> memory-mappable uint8 arrays, a prepared manifest and a dataset card.

Each image is decoded once (in parallel), passed through the single preprocessing function at every
configured size, and written to ``images_<size>.npy`` (row i = row i of ``manifest.csv``). Splits
are made after decoding so that identical pixels filed under different patients land together.
The output folder appears whole or not at all.
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

if TYPE_CHECKING:
    from cxr.config import Config

log = logging.getLogger(__name__)
META_COLUMNS = ("view", "sex", "age", "patient_key")
EXTRA_COLUMNS = ("format", "photometric", "modality", "body_part")


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


def spec_for(cfg: "Config", size: int) -> PreprocessSpec:
    return PreprocessSpec(size=size, resize=cfg.prepare.resize, clip_percentiles=tuple(cfg.prepare.clip_percentiles))


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
        "meta": {k: image.meta.get(k) for k in META_COLUMNS + EXTRA_COLUMNS},
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
        partial = {s: np.lib.format.open_memmap(tmp / f".all_{s}.npy", "w+", np.uint8, (n, s, s)) for s in job.sizes}
        results = _decode_all(paths, job, partial, cfg.prepare.workers)
        errors = {i: r["error"] for i, r in results.items() if "error" in r}
        if len(errors) > cfg.prepare.max_failure_fraction * n or len(errors) == n:
            examples = "; ".join(list(errors.values())[:3])
            raise PrepareError(
                f"{len(errors)} of {n} images could not be read, above prepare.max_failure_fraction="
                f"{cfg.prepare.max_failure_fraction}; nothing was written. First errors: {examples}"
            )
        ok = np.array(sorted(set(range(n)) - set(errors)), dtype=np.int64)
        prepared = _prepared_manifest(manifest, results, ok)
        groups = merge_groups(prepared["patient_key"], prepared["pixel_hash"])
        prepared["split"] = assign_splits(
            prepared,
            val=cfg.prepare.split.val,
            test=cfg.prepare.split.test,
            seed=cfg.project.seed,
            use_official=cfg.prepare.split.use_official,
            groups=groups,
        ).to_numpy()
        for s, arr in partial.items():
            final = np.lib.format.open_memmap(array_path(tmp, s), "w+", np.uint8, (len(ok), s, s))
            for start in range(0, len(ok), 4096):  # chunked: the full array may not fit in memory
                final[start : start + 4096] = arr[ok[start : start + 4096]]
            final.flush()
            del final, arr
            (tmp / f".all_{s}.npy").unlink()
        partial.clear()
        prepared.to_csv(tmp / "manifest.csv", index=False)
        card = _card(cfg, info, prepared, errors, manifest, results, tmp)
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


def _decode_all(paths: list[str], job: _Job, partial: dict[int, np.ndarray], workers: int) -> dict[int, dict]:
    results: dict[int, dict] = {}
    tasks = [(i, p, job) for i, p in enumerate(paths)]

    def keep(i: int, r: dict) -> None:
        for s, a in r.pop("arrays", {}).items():
            partial[s][i] = a
        results[i] = r

    with progress_bar("prepare: decoding", total=len(tasks)) as advance:
        if workers <= 1 or len(tasks) < 64:
            for t in tasks:
                keep(*_decode(t))
                advance()
        else:
            # fork: workers inherit imported modules instead of re-importing them
            with mp.get_context("fork").Pool(workers) as pool:
                for i, r in pool.imap_unordered(_decode, tasks, chunksize=16):
                    keep(i, r)
                    advance()
    return results


def _prepared_manifest(manifest: pd.DataFrame, results: dict[int, dict], ok: np.ndarray) -> pd.DataFrame:
    """Header metadata fills what the source left empty (RSNA view/sex/age live only in the DICOM)."""
    rows = manifest.iloc[ok].reset_index(drop=True).copy()
    meta = pd.DataFrame([results[int(i)]["meta"] for i in ok])
    for col in META_COLUMNS:
        rows[col] = rows[col].where(rows[col].notna(), meta[col]) if col in rows else meta[col]
    for col in EXTRA_COLUMNS:
        rows[col] = meta[col]
    rows["pixel_hash"] = [results[int(i)]["pixel_hash"] for i in ok]
    rows["file_sha"] = [results[int(i)]["file_sha"] for i in ok]
    if "origin" in rows:  # the source's own file name stays in data/raw only
        rows = rows.drop(columns=["origin"])
    return rows


def _counts(prepared: pd.DataFrame, task: str, classes: list[str]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for split, part in prepared.groupby("split"):
        if task == "multilabel":
            findings = part["label"].fillna("").str.split("|")
            counts[split] = {c: int(findings.apply(lambda f, c=c: c in f).sum()) for c in classes}
            counts[split]["(none)"] = int((part["label"].fillna("") == "").sum())
        else:
            vc = part["label"].value_counts()
            counts[split] = {c: int(vc.get(c, 0)) for c in classes}
    return counts


def _card(cfg, info, prepared, errors, manifest, results, tmp: Path) -> dict[str, Any]:
    split = prepared["split"]
    dup_cross = leaks(prepared, split, "pixel_hash")
    dup_within = int(prepared.duplicated("pixel_hash", keep=False).sum())
    patient_leaks = leaks(prepared, split, "patient_key")
    input_hash = hashlib.sha256()
    for i in range(len(manifest)):
        input_hash.update(f"{manifest['label'].iloc[i]}|{results[i].get('file_sha', 'ERR')}\n".encode())
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
