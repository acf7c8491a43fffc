"""Another site's labelled films as an external test set, with its manifest (`cxr synthesize-site`)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from cxr.data.sources.base import SourceError
from cxr.data.sources.synthetic.sites import SiteProfile, site_config, site_profile
from cxr.data.sources.synthetic.source import CLASSES, SOURCE, plan, write_films
from cxr.fsutil import atomic_dir
from cxr.imaging import patient_key

if TYPE_CHECKING:
    from cxr.config import Config


SITE_MANIFEST = "manifest.csv"


SITE_INFO = "site.json"


def write_site(
    cfg: "Config",
    site: str,
    out: Path,
    *,
    n_patients: int | None = None,
    seed: int | None = None,
    workers: int | None = None,
) -> pd.DataFrame:
    """Write ``site``'s labelled films as ``out/<label>/<patient_key>_<k>.dcm`` and return their manifest.

    ``cxr evaluate-external --data`` reads the folder (labels from the sub-folder names) or
    ``out/manifest.csv`` (the manifest source's columns, adding patient keys, view, age and sex).
    ``out`` appears whole or not at all; an existing folder is replaced only if this function wrote it.
    """
    profile = site_profile(site)
    cfg = site_config(cfg, profile, n_patients=n_patients, seed=seed)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / SITE_INFO).is_file():
        raise SourceError(f"{out} exists and was not written by synthesize-site; give a new or empty folder")
    plans = [replace(p, file=f"{CLASSES[p.label]}/{Path(p.file).name}") for p in plan(cfg, profile)]
    manifest = pd.DataFrame(
        {
            "path": [p.file for p in plans],
            "label": [CLASSES[p.label] for p in plans],
            "patient_id": [patient_key(profile.patient_id(p.patient), SOURCE) for p in plans],
            "view": [p.view for p in plans],
            "age": [p.age for p in plans],
            "sex": [p.sex for p in plans],
        }
    )
    with atomic_dir(out) as tmp:
        for label in CLASSES:
            (tmp / label).mkdir()
        write_films(cfg, plans, tmp, profile, workers)
        manifest.to_csv(tmp / SITE_MANIFEST, index=False)
        (tmp / SITE_INFO).write_text(json.dumps(_site_info(cfg, profile, manifest), indent=2) + "\n")
    return manifest


def _site_info(cfg: "Config", site: SiteProfile, manifest: pd.DataFrame) -> dict[str, Any]:
    sc = cfg.data.synthetic
    return {
        "note": "SYNTHETIC data from cxr's generator: fictitious patients, no clinical meaning",
        "site": asdict(site),
        "data.synthetic": sc.model_dump(mode="json"),
        "n_images": len(manifest),
        "n_patients": int(manifest["patient_id"].nunique()),
        "images_per_label": manifest["label"].value_counts().sort_index().to_dict(),
    }
