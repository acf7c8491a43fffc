"""reports/champion.json: the registry's champion and its own evaluation, beside the pipeline model's metrics.json.

`dvc repro` evaluates the model it just trained (models/cxr); the champion may be another model (a tuning
trial promoted with `cxr promote`). dvc.yaml lists this file as a metric too, so `dvc metrics show` labels
both by path instead of presenting the pipeline's model as the promoted one. `cxr promote` and `cxr rollback`
write it whenever they move the alias.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr.evaluation.metrics import headline
from cxr.fsutil import atomic_write_text
from cxr.tracking import registry
from cxr.tracking.runs import logged_evaluation

if TYPE_CHECKING:
    from cxr.config import Config

FILE = "champion.json"


def champion_summary(cfg: "Config") -> dict[str, Any]:
    """Which version holds the alias, its run, and its val / test headline metrics (from its run's evaluation)."""
    version = registry.champion(cfg)
    out: dict[str, Any] = {"model": cfg.mlflow.registered_model, "alias": cfg.registry.alias, "version": None}
    if version is None:
        return out
    out.update(version=int(version.version), run_id=version.run_id)
    evaluation = logged_evaluation(version.run_id) if version.run_id else None
    for split, result in (evaluation or {}).get("splits", {}).items():
        out[split] = headline(result)
    return out


def write_champion_summary(cfg: "Config") -> Path:
    path = Path(cfg.paths.reports) / FILE
    atomic_write_text(path, json.dumps(champion_summary(cfg), indent=2, allow_nan=False) + "\n")
    return path
