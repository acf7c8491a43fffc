"""The out-of-distribution part of an external report: how much of the set the model says it was not built for,
where (per view, sex and age band), what the metrics are on the films it does accept, and a verdict line.

It reads the service's own answers (``ood`` in every predict answer), so the report says what the deployed
model would say, film by film.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cxr.evaluation.evaluate import ModelTask, subgroup_values, task_metrics

if TYPE_CHECKING:
    from cxr.config import Config
    from cxr.serving.client import Answer

NOT_BUILT_FOR = 0.5  # above this share out of distribution, the verdict is that the model was not built for the set
NOTABLE = 0.15  # above this share (validation lets ~5% out), the verdict asks to read the in-distribution metrics


def ood_flags(answers: list["Answer"]) -> tuple[bool, np.ndarray]:
    """(whether the model checks, per row: answered and out of distribution)."""
    checks = [(a.response or {}).get("ood") or {} for a in answers]
    checked = any(c.get("checked") for c in checks)
    outside = np.array([bool(c.get("checked")) and not c.get("in_distribution", True) for c in checks])
    return checked, outside


def ood_section(
    model: ModelTask,
    table: pd.DataFrame,
    scored: np.ndarray,
    rows: np.ndarray,
    outside: np.ndarray,
    y: np.ndarray,
    probs: np.ndarray,
    cfg: "Config",
    checked: bool,
) -> dict[str, Any]:
    """Share flagged overall and per subgroup (of every ``scored`` film: a property of the set), the metrics on the
    in-distribution films among ``rows`` (the films the report's metrics are on), the verdict."""
    if not checked:
        return {"checked": False, "level": "unchecked", "verdict": "the model has no check: every film was decided"}
    n, flagged = int(scored.sum()), int((scored & outside).sum())
    inside = rows & ~outside
    both_classes = not model.task.binary or 0 < y[inside].sum() < inside.sum()
    return {
        "checked": True,
        "images": n,
        "flagged": flagged,
        "share": flagged / n if n else None,
        "by_subgroup": share_by_subgroup(table[scored], outside[scored]),
        "in_distribution_metrics": task_metrics(model, y[inside], probs[inside], cfg) if both_classes else None,
        **verdict(flagged, n),
    }


def share_by_subgroup(rows: pd.DataFrame, outside: np.ndarray) -> dict[str, dict[str, dict[str, Any]]]:
    """Per view, sex and age band (those ``subgroups`` reports): how many films, and how many flagged."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, values in subgroup_values(rows).items():
        values = pd.Series(values).fillna("unknown").astype(str)
        out[name] = {
            v: {"images": int(m.sum()), "flagged": int(outside[m].sum()), "share": float(outside[m].mean())}
            for v in sorted(values.unique())
            for m in [(values == v).to_numpy()]
        }
    return out


def verdict(flagged: int, n: int) -> dict[str, str]:
    """``level`` (not_built_for | notable | usual) and the ``verdict`` line that says it."""
    share = flagged / n if n else 0.0
    said = f"{flagged} of {n} films ({share:.0%}) are out of distribution"
    if share > NOT_BUILT_FOR:
        line = f"this model was not built for these films: {said}, and the service abstains on them"
        return {"level": "not_built_for", "verdict": line}
    if share > NOTABLE:
        return {"level": "notable", "verdict": f"{said}: read the metrics on the in-distribution films"}
    return {"level": "usual", "verdict": f"{said}, about what validation lets through"}
