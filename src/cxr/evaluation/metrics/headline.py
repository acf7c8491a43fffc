"""The headline numbers of a result as flat ``{name: value}`` for DVC metrics and MLflow."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from cxr.evaluation.metrics.checks import finite_or_none

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-/]+")


def headline(metrics_dict: Mapping[str, Any], *, prefix: str = "", per_class: bool = False) -> dict[str, float]:
    """Flat ``{name: value}`` of the top-level ``{"value": ...}`` entries (for DVC / MLflow).

    Undefined (None) values are left out. With ``per_class=True`` the per-class AUROC/AUPRC
    of a multiclass or multilabel result are added as ``"auroc/<class>"``, ``"auprc/<class>"``.
    """
    out: dict[str, float] = {}
    for key, entry in metrics_dict.items():
        if isinstance(entry, Mapping) and "value" in entry:
            v = finite_or_none(entry["value"])
            if v is not None:
                out[f"{prefix}{key}"] = v
    if per_class and isinstance(metrics_dict.get("per_class"), Mapping):
        for name, entry in metrics_dict["per_class"].items():
            safe = _KEY_UNSAFE.sub("_", str(name))
            for metric in ("auroc", "auprc"):
                val = entry.get(metric) if isinstance(entry, Mapping) else None
                if isinstance(val, Mapping):
                    val = val.get("value")
                v = finite_or_none(val)
                if v is not None:
                    out[f"{prefix}{metric}/{safe}"] = v
    return out
