"""One module per raw source. Each exposes ``build(cfg, raw_dir) -> SourceData``."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from cxr.data.sources.base import MANIFEST_COLUMNS, SourceData, SourceError

if TYPE_CHECKING:
    from cxr.config import Config

SOURCES = ("synthetic", "medmnist", "kermany", "rsna", "covid_radiography", "nih", "manifest")


def build_source(cfg: "Config", raw_dir: Path) -> SourceData:
    name = cfg.data.source
    if name not in SOURCES:
        raise SourceError(f"unknown data.source {name!r}; choose one of {', '.join(SOURCES)}")
    module = importlib.import_module(f"cxr.data.sources.{name}")
    return module.build(cfg, Path(raw_dir))


__all__ = ["MANIFEST_COLUMNS", "SOURCES", "SourceData", "SourceError", "build_source"]
