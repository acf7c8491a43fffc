"""The synthetic source: a deterministic plan of patients and films, written in parallel as DICOM files."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cxr.data.sources.base import SourceData
from cxr.data.sources.synthetic.anatomy import Anatomy, Sex, View, sample_anatomy
from cxr.data.sources.synthetic.dicom import _EPOCH, Encoding, encode, make_dataset
from cxr.data.sources.synthetic.render import render
from cxr.data.sources.synthetic.sites import INTERNAL, Scanner, SiteProfile, scan
from cxr.imaging import patient_key
from cxr.task import Task

if TYPE_CHECKING:
    from cxr.config import Config


SOURCE = "synthetic"


CLASSES = ["normal", "pneumonia"]


IMAGES_DIR = "images"


# Stratification block for the encoding mix: every 10 consecutive images hold the exact fractions.
BLOCK = 10


EIGHT_BIT_FRACTION = 0.2


RESCALE_FRACTION = 0.5  # of the 12-bit files


WINDOW_FRACTION = 0.4


CR_FRACTION = 0.3


# (slope, intercept) pairs written on the rescaled 12-bit files
RESCALES = ((1.0, -1024.0), (0.5, 0.0), (2.0, -2048.0), (1.0, 100.0))


PARALLEL_MIN_IMAGES = 1500


@dataclass(frozen=True)
class ImagePlan:
    index: int  # global image number (the encoding mix is stratified over it)
    patient: int
    k: int  # image number within the patient (follow-up)
    label: int
    sex: Sex
    age: int
    view: View
    study_date: _dt.date
    encoding: Encoding
    file: str  # relative to raw_dir


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) % (1 << 64), *map(int, keys)]))


def _stratified(seed: int, salt: int, index: int, fraction: float, words: tuple[int, ...] = ()) -> bool:
    """Flags ``fraction`` of every block of BLOCK consecutive images (stratified), at random positions."""
    block, pos = divmod(index, BLOCK)
    r = _rng(seed, *words, 7_000_000 + salt, block)
    offset = _rng(seed, *words, 7_000_000 + salt, 10**9).random()

    def cum(b: int) -> int:
        return int(np.floor(b * BLOCK * fraction + offset))

    count = cum(block + 1) - cum(block)
    return pos in r.permutation(BLOCK)[:count]


def plan(cfg: "Config", site: SiteProfile = INTERNAL) -> list[ImagePlan]:
    """Every image's patient, label, demographics and encoding (cheap; no pixels).

    ``cfg`` carries the site's settings already (``site_config``); ``site`` adds who its patients are.
    """
    sc = cfg.data.synthetic
    w = site.seed_words
    out: list[ImagePlan] = []
    for n in range(sc.n_patients):
        r = _rng(sc.seed, *w, n)
        label = int(r.random() < sc.prevalence)
        sex: Sex = "F" if r.random() < 0.5 else "M"
        age = int(np.clip(np.rint(r.normal(site.age_mean, 17)), 18, 95))
        n_images = int(r.integers(1, sc.images_per_patient_max + 1))
        first = _EPOCH + _dt.timedelta(days=int(r.integers(0, 9 * 365)))
        key = patient_key(site.patient_id(n), SOURCE)
        day = first
        for k in range(n_images):
            i = len(out)
            ri = _rng(sc.seed, *w, n, k, 1)
            view: View = "AP" if ri.random() < site.ap_fraction else "PA"
            bits = 8 if _stratified(sc.seed, 1, i, EIGHT_BIT_FRACTION, w) else 12
            rescale = None
            if bits == 12 and _stratified(sc.seed, 2, i, RESCALE_FRACTION, w):
                rescale = RESCALES[int(ri.integers(len(RESCALES)))]
            enc = Encoding(
                bits=bits,
                monochrome1=_stratified(sc.seed, 3, i, sc.monochrome1_fraction, w),
                jpeg2000=_stratified(sc.seed, 4, i, sc.jpeg2000_fraction, w),
                rescale=rescale,
                window=_stratified(sc.seed, 5, i, WINDOW_FRACTION, w),
                modality="CR" if ri.random() < CR_FRACTION else "DX",
            )
            if k:
                day = day + _dt.timedelta(days=int(ri.integers(1, 40)))
            out.append(
                ImagePlan(
                    index=i,
                    patient=n,
                    k=k,
                    label=label,
                    sex=sex,
                    age=age + (day - first).days // 365,
                    view=view,
                    study_date=day,
                    encoding=enc,
                    file=f"{IMAGES_DIR}/{key}_{k}.dcm",
                )
            )
    return out


def patient_anatomy(seed: int, patient: int, sex: Sex, difficulty: float, site: SiteProfile = INTERNAL) -> Anatomy:
    return sample_anatomy(_rng(seed, *site.seed_words, patient, 10**6), sex, difficulty)


def generate(p: ImagePlan, seed: int, difficulty: float, size: int, site: SiteProfile = INTERNAL) -> bytes:
    """One planned image as DICOM file bytes (a pure function of its arguments)."""
    w = site.seed_words
    anatomy = patient_anatomy(seed, p.patient, p.sex, difficulty, site)
    rng = _rng(seed, *w, p.patient, p.k, 2)
    image = render(rng, p.label, difficulty, size, view=p.view, sex=p.sex, anatomy=anatomy)
    if site.scanner != Scanner():  # the internal scanner leaves the image (and its bytes) untouched
        image = scan(image, site.scanner, _rng(seed, *w, p.patient, p.k, 4))
    ds = make_dataset(
        image,
        p.encoding,
        _rng(seed, *w, p.patient, p.k, 3),
        patient_id=site.patient_id(p.patient),
        patient_name=f"SYNTHETIC^PATIENT{p.patient:05d}",
        sex=p.sex,
        age=p.age,
        view=p.view,
        study_date=p.study_date,
        uid_entropy=(seed, p.patient, p.k),
    )
    return encode(ds)


def _blas_threads(n: int) -> Any:
    """Small matrix products are slower multi-threaded (thread wake-ups dominate); keep BLAS at n."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(n, user_api="blas")


def _one_blas_thread() -> None:
    global _WORKER_LIMIT
    _WORKER_LIMIT = _blas_threads(1)


_WORKER_LIMIT: Any = None


def _write(args: tuple[ImagePlan, int, float, int, str, SiteProfile]) -> str:
    p, seed, difficulty, size, raw_dir, site = args
    path = Path(raw_dir) / p.file
    data = generate(p, seed, difficulty, size, site)
    if not (path.is_file() and path.read_bytes() == data):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return p.file


def write_films(cfg: "Config", plans: list[ImagePlan], out_dir: Path, site: SiteProfile, workers: int | None) -> None:
    """Generate every planned file under ``out_dir``, in ``workers`` processes for large sets."""
    sc = cfg.data.synthetic
    if workers is None:
        workers = cfg.prepare.workers if len(plans) >= PARALLEL_MIN_IMAGES else 1
    jobs = [(p, sc.seed, sc.difficulty, sc.size, str(out_dir), site) for p in plans]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers, initializer=_one_blas_thread) as pool:
            list(pool.map(_write, jobs, chunksize=64))
    else:
        with _blas_threads(1):
            for job in jobs:
                _write(job)


def build(cfg: "Config", raw_dir: Path, workers: int | None = None) -> SourceData:
    """Write the synthetic DICOM files under ``raw_dir/images`` and return their manifest.

    Stale ``.dcm`` files in that folder (from a larger earlier build) are removed so the raw folder
    holds exactly what the manifest lists. ``workers`` defaults to ``prepare.workers`` for large
    builds (>= PARALLEL_MIN_IMAGES images) and 1 otherwise; the files do not depend on it.
    """
    sc = cfg.data.synthetic
    raw_dir = Path(raw_dir)
    images_dir = raw_dir / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    plans = plan(cfg)
    write_films(cfg, plans, raw_dir, INTERNAL, workers)
    wanted = {Path(p.file).name for p in plans}
    for stale in images_dir.glob("*.dcm"):
        if stale.name not in wanted:
            stale.unlink()

    manifest = pd.DataFrame(
        {
            "image": [p.file for p in plans],
            "label": [CLASSES[p.label] for p in plans],
            "patient_key": [patient_key(f"SYN{p.patient:05d}", SOURCE) for p in plans],
            "view": [p.view for p in plans],
            "age": [p.age for p in plans],
            "sex": [p.sex for p in plans],
            "follow_up": [p.k for p in plans],
            "source": SOURCE,
            "split": None,
        }
    )
    n_pos = int(manifest["label"].eq("pneumonia").sum())
    notes = [
        f"SYNTHETIC data: {len(plans)} generated chest-radiograph-like DICOM images of "
        f"{sc.n_patients} fictitious patients ({n_pos} pneumonia images); for exercising the pipeline only, "
        "results on it say nothing about clinical performance.",
        f"synthetic generator: seed={sc.seed}, size={sc.size}, difficulty={sc.difficulty}, "
        f"prevalence={sc.prevalence}, jpeg2000_fraction={sc.jpeg2000_fraction}, "
        f"monochrome1_fraction={sc.monochrome1_fraction}",
    ]
    return SourceData(manifest=manifest, task=Task.BINARY, classes=list(CLASSES), files_in_raw=True, notes=notes)
