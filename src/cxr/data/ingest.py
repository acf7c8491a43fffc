"""ingest: a raw source -> ``paths.raw`` (images + manifest.csv + source.json), which DVC versions."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from cxr.data.sources import build_source
from cxr.fsutil import atomic_dir

if TYPE_CHECKING:
    from cxr.config import Config

log = logging.getLogger(__name__)


def ingest(cfg: "Config") -> Path:
    """Materialise the configured source under ``cfg.paths.raw``; all or nothing."""
    raw = Path(cfg.paths.raw)
    with atomic_dir(raw) as tmp:
        data = build_source(cfg, tmp)
        manifest = data.manifest
        if not data.files_in_raw and cfg.data.copy_images:
            (tmp / "images").mkdir(exist_ok=True)
            copied = []
            for i, src in enumerate(manifest["image"]):
                # A neutral file name: source file names can carry patient identifiers.
                dst = Path("images") / f"{i:06d}{Path(src).suffix.lower()}"
                shutil.copyfile(src, tmp / dst)
                copied.append(dst.as_posix())
            manifest = manifest.assign(image=copied)
        elif not data.files_in_raw:
            manifest = manifest.assign(image=[str(Path(p).resolve()) for p in manifest["image"]])
        manifest.to_csv(tmp / "manifest.csv", index=False)
        info = {
            "source": cfg.data.source,
            "synthetic": cfg.data.source == "synthetic",
            "task": data.task,
            "classes": data.classes,
            "n_images": len(manifest),
            "notes": data.notes,
        }
        (tmp / "source.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("ingested %d images from %s into %s", len(manifest), cfg.data.source, raw)
    return raw
