"""evaluate_external: a model on another hospital's data, through the deployed service's HTTP API.

Every image is sent to ``{url}/predict`` (bounded concurrency, retries, a progress bar); answers are
cached in the output folder so an interrupted run resumes. The report holds the metrics with bootstrap
CIs at the model's own threshold, subgroups, plots, every refused or failed file, and a comparison with
the model's internal test metrics, as JSON plus one self-contained HTML file, and is logged to MLflow as
an evaluation run tagged with the served model version. With ``model=`` (``models:/NAME@champion`` or a
model directory) the same happens in-process, through the service's own answer function (cxr.serving.served),
when no service is running. For a binary model the report also sets the external score distributions and
calibration beside the internal test set's (why a specificity drops at a fixed threshold); with
``calibrate`` it chooses a site threshold on part of the set and judges both thresholds on the rest
(cxr.evaluation.site). File names (often patient names in PACS exports) stay in the local report: what is
logged to MLflow holds a salted hash of each instead (``FileIds``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import logging
import secrets
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cxr.errors import UserError
from cxr.evaluation import metrics, plots, site
from cxr.evaluation.evaluate import plots_for, subgroups, task_metrics
from cxr.evaluation.external_data import ExternalSet, load_external_set, map_labels, targets
from cxr.evaluation.ood_report import ood_flags, ood_section
from cxr.evaluation.report_html import render
from cxr.evaluation.response_cache import ResponseCache, cache_key
from cxr.fsutil import atomic_dir
from cxr.progress import progress_bar
from cxr.serving.client import Answer, ServiceClient
from cxr.serving.served import ServedModel
from cxr.tracking import runs as tracking
from cxr.tracking.registry import check_site_name, record_external_ood, save_operating_point
from cxr.tracking.uris import registry_version

if TYPE_CHECKING:
    import httpx

    from cxr.config import Config
    from cxr.serving.served import ServedModel as Served

log = logging.getLogger(__name__)

IN_PROCESS = "in-process"
CACHE_FILE = "responses.jsonl"
REPORT_DIR = "report"
# The headline metrics compared with the internal test set (binary; other tasks use their macro metrics).
COMPARED = tuple(k for k in metrics.BINARY_METRICS if not k.startswith("sens_at_spec")) + (
    "macro_auroc",
    "macro_auprc",
    "macro_f1",
)
LOWER_IS_BETTER = {"brier", "ece"}
# A drop above this (in the metric's units, direction-aware) is flagged in the report.
NOTABLE_DROP = 0.05
# A subgroup with fewer positives or negatives than this is flagged: its sensitivity or specificity rests
# on a handful of films, so its CI is too wide to tell it from the whole set.
MIN_SUBGROUP_CLASS = 10
LOCAL_NAMES_NOTE = "file names appear in this local report only; MLflow holds salted hashes"
MLFLOW_NAMES_NOTE = (
    "file names are salted hashes here (HMAC-SHA256, a random salt per report, kept nowhere): the names are in the "
    "local report only, whose predictions.csv has the same file_id column"
)


@dataclass
class EvaluatedModel:
    """What scoring needs (task, labels, threshold) and who the model is, from the service's /metadata
    (in-process: the same metadata, from cxr.serving.served without HTTP)."""

    task: str
    labels: list[str]
    threshold: Any
    name: str | None = None
    version: str | None = None
    uri: str | None = None
    run_id: str | None = None
    dataset_hash: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def identity(self) -> str:
        """What cached answers are keyed on: the registry version, else the training run, else the info."""
        if self.version:
            return f"{self.name}/{self.version}"
        if self.run_id:
            return f"run:{self.run_id}"
        return "info:" + hashlib.sha256(json.dumps(self.info, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def stamp(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "uri": self.uri}

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "EvaluatedModel":
        model, training = meta.get("model") or {}, meta.get("training") or {}
        if not meta.get("labels") or not meta.get("task"):
            raise UserError(
                f"the service's /metadata names no task and labels (keys: {sorted(meta)}); is this a cxr service?"
            )
        version = model.get("version")
        return cls(
            task=meta["task"],
            labels=list(meta["labels"]),
            threshold=meta.get("threshold"),
            name=model.get("name"),
            version=None if version is None else str(version),
            uri=model.get("uri"),
            run_id=training.get("run_id"),
            dataset_hash=training.get("dataset_hash"),
            info=meta,
        )


def load_in_process(uri: str | Path, cfg: "Config | None" = None) -> "Served":
    """The service's own model object, without HTTP: loaded exactly as `bentoml serve` loads it
    (``models:/NAME@ALIAS`` resolved to its version once, so the version reported is the one that answered)."""

    return ServedModel.load(cfg, uri)


@dataclass(frozen=True)
class FileIds:
    """A salted hash of each file name, for what leaves this machine (MLflow).

    The salt is random per report and never written: nobody, not even whoever holds the MLflow store, can test a
    candidate name (a patient's) against a hash. A per-store secret would make the ids stable across reports, but
    that secret would have to be kept and guarded somewhere, and the ids would link one file across runs; the
    content's sha256 already says when two rows are the same image. The local report's predictions.csv carries
    the same id beside each name, so its owner can match MLflow's rows to files."""

    salt: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    def __call__(self, name: str) -> str:
        return hmac.new(self.salt, name.encode(), hashlib.sha256).hexdigest()[:20]


# --- scoring --------------------------------------------------------------------------------------


@dataclass
class Scored:
    answers: list[Answer]  # one per row of the external table, in order
    sent: int
    cached: int


def _keys(ext: ExternalSet, endpoint: str, model: EvaluatedModel) -> list[str]:
    return [cache_key(h, endpoint, model.identity) for h in ext.table["sha256"]]


def _advance_fields(answers: list[Answer | None]) -> dict[str, int]:
    done = [a for a in answers if a is not None]
    return {"ok": sum(a.status == "ok" for a in done), "not ok": sum(a.status != "ok" for a in done)}


def score_remote(
    ext: ExternalSet, model: EvaluatedModel, cache: ResponseCache, client_kwargs: dict[str, Any], concurrency: int
) -> Scored:
    return asyncio.run(_score_remote(ext, model, cache, client_kwargs, concurrency))


async def _score_remote(
    ext: ExternalSet, model: EvaluatedModel, cache: ResponseCache, client_kwargs: dict[str, Any], concurrency: int
) -> Scored:
    async with ServiceClient(concurrency=concurrency, **client_kwargs) as client:
        keys = _keys(ext, f"{client.url}/predict", model)
        answers: list[Answer | None] = [cache.get(k) for k in keys]
        todo = [i for i, a in enumerate(answers) if a is None]
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int, advance: Any) -> None:
            row = ext.table.iloc[i]
            async with gate:
                data = await asyncio.to_thread(Path(row["image"]).read_bytes)
                answer = await client.predict(data, "upload" + Path(row["image"]).suffix.lower())
            answers[i] = _check_model(answer, model)
            cache.put(keys[i], answers[i])
            advance(**_advance_fields(answers))

        with progress_bar(f"scoring {len(todo)} images via {client.url}", total=len(todo)) as advance:
            await asyncio.gather(*(one(i, advance) for i in todo))
    return Scored([a for a in answers if a is not None], sent=len(todo), cached=len(keys) - len(todo))


def _check_model(answer: Answer, model: EvaluatedModel) -> Answer:
    """An answer from another model version (the champion moved mid-run) must not be mixed in."""
    if answer.status != "ok" or model.version is None:
        return answer
    served = (answer.response or {}).get("model", {}).get("version")
    if served is not None and str(served) != model.version:
        return Answer(
            "failed",
            http_status=answer.http_status,
            attempts=answer.attempts,
            error=f"answered by model version {served}, not {model.version} (the served model changed "
            "during the run); run again to score it with the current model",
        )
    return answer


def score_local(ext: ExternalSet, model: EvaluatedModel, served: "Served", cache: ResponseCache) -> Scored:
    """The service's own answer function (cxr.serving.served) on the same bytes: same answers, same refusals.

    One image per forward pass, as the service does for one request at a time: float32 results can
    differ in the last bit with the batch an image shares, and an image's score should not depend on
    its neighbours."""
    keys = _keys(ext, IN_PROCESS, model)
    answers: list[Answer | None] = [cache.get(k) for k in keys]
    todo = [i for i, a in enumerate(answers) if a is None]
    with progress_bar(f"scoring {len(todo)} images in-process", total=len(todo)) as advance:
        for i in todo:
            (result,) = served.predict([Path(ext.table["image"].iat[i]).read_bytes()])
            if "error" in result:
                answers[i] = Answer("refused", http_status=result.get("status"), error=result["error"])
            else:
                answers[i] = Answer("ok", response=result, http_status=200)
            cache.put(keys[i], answers[i])
            advance(**_advance_fields(answers))
    return Scored([a for a in answers if a is not None], sent=len(todo), cached=len(keys) - len(todo))


# --- report ---------------------------------------------------------------------------------------


def probabilities(responses: list[dict[str, Any]], model: EvaluatedModel) -> np.ndarray:
    """(N,) positive-class probability (binary) or (N, K) per label, in the model's label order."""
    if model.task == "binary":
        return np.array([r["probabilities"][model.labels[1]] for r in responses], dtype=float)
    return np.array([[r["probabilities"][lab] for lab in model.labels] for r in responses], dtype=float)


def training_evaluation(model: EvaluatedModel, cfg: "Config") -> dict[str, Any] | None:
    """evaluation.json of the model's training run (read once: the comparison and the score shift both use it),
    or None where there is no run or it kept none."""
    if not (model.run_id and cfg.mlflow.enabled):
        return None
    tracking.configure(cfg)
    try:
        return tracking.logged_evaluation(model.run_id)
    except ValueError:  # not JSON: as if there were none
        return None


def internal_metrics(model: EvaluatedModel, cfg: "Config", evaluation: dict[str, Any] | None) -> dict[str, Any]:
    """The model's own test-set metrics: the evaluation report of its training run (with CIs), else the
    run's ``test_*`` metrics, else the registered version's tags, else what /metadata carries."""
    found: dict[str, Any] | None = None
    source = None
    if model.run_id and cfg.mlflow.enabled:
        found, source = _from_run(model.run_id, cfg, evaluation)
    if found is None and model.version and cfg.mlflow.enabled:
        entry = registry_version(f"models:/{model.name}/{model.version}")
        tags = entry.tags if entry is not None else {}
        found = {k[5:]: {"value": float(v)} for k, v in tags.items() if k.startswith("test_") and _is_number(v)}
        source = f"registered model {model.name} version {model.version} tags"
    if not found:
        given = model.info.get("metrics") if isinstance(model.info.get("metrics"), dict) else {}
        found = {k[5:]: {"value": float(v)} for k, v in given.items() if k.startswith("test_") and _is_number(v)}
        source = "the service's /metadata"
    if not found:
        return {
            "available": False,
            "reason": "no internal test metrics found (no MLflow run, registry tags or metrics in the model metadata)",
        }
    return {"available": True, "source": source, "metrics": found}


def _is_number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return not isinstance(v, bool)


def _from_run(
    run_id: str, cfg: "Config", evaluation: dict[str, Any] | None
) -> tuple[dict[str, Any] | None, str | None]:
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking.configure(cfg)
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        log.warning(
            "the model's training run %s is not in %s: no internal comparison from it",
            run_id,
            mlflow.get_tracking_uri(),
        )
        return None, None
    test = ((evaluation or {}).get("splits") or {}).get("test")
    if test is not None:
        return (
            {k: v for k, v in test.items() if isinstance(v, dict) and "value" in v},
            f"MLflow run {run_id}: evaluation/evaluation.json (test split)",
        )
    found = {k[5:]: {"value": v} for k, v in run.data.metrics.items() if k.startswith("test_")}
    return (found or None), f"MLflow run {run_id}: test_* metrics"


def compare(internal: dict[str, Any], external: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per metric: internal and external value with CIs, the drop (internal - external, so positive is worse
    except for the calibration errors), whether the CIs overlap, and whether the external result is notably worse."""
    out = {}
    for key in COMPARED:
        ext, inn = external.get(key), internal.get(key)
        if (
            not isinstance(ext, dict)
            or not isinstance(inn, dict)
            or ext.get("value") is None
            or inn.get("value") is None
        ):
            continue
        bounds = (inn.get("ci_low"), inn.get("ci_high"), ext.get("ci_low"), ext.get("ci_high"))
        overlap = None if None in bounds else bool(bounds[0] <= bounds[3] and bounds[2] <= bounds[1])
        drop = inn["value"] - ext["value"]
        out[key] = {
            "internal": inn,
            "external": {k: ext.get(k) for k in ("value", "ci_low", "ci_high")},
            "drop": drop,
            "cis_overlap": overlap,
            "notably_worse": bool((-drop if key in LOWER_IS_BETTER else drop) > NOTABLE_DROP),
        }
    return out


@dataclass
class SiteRequest:
    """``--calibrate``: which rows choose the site threshold, with which rule, and where it is saved."""

    split: site.CalibrationSplit
    rule: dict[str, Any]
    requested: int | float
    save_as: str | None = None


def _row_scores(answers: list[Answer], model: EvaluatedModel) -> tuple[np.ndarray, np.ndarray]:
    """(scored mask, probabilities) per row of the table; rows without an answer hold NaN."""
    ok = np.array([a.status == "ok" for a in answers])
    if not ok.any():
        first = next((a.error for a in answers if a.error), "no answer")
        raise UserError(
            f"none of the {len(answers)} images was scored ({Counter(a.status for a in answers)}); first error: {first}"
        )
    probs = probabilities([a.response for a in answers if a.status == "ok"], model)
    full = np.full((len(answers), *probs.shape[1:]), np.nan)
    full[ok] = probs
    return ok, full


def build_report(
    ext: ExternalSet,
    model: EvaluatedModel,
    scored: Scored,
    cfg: "Config",
    endpoint: str,
    plots_dir: Path,
    calibration: SiteRequest | None = None,
) -> dict[str, Any]:
    """The report; with ``calibration`` every metric, plot and subgroup is on the evaluation part only."""
    table, answers = ext.table, scored.answers
    mapping = map_labels(table["label"].tolist(), model.labels, model.task)
    y = targets(table["label"], model.labels, model.task)
    ok, probs = _row_scores(answers, model)
    checked, outside = ood_flags(answers)
    rows = ok if calibration is None else ok & ~calibration.split.calibration
    if not rows.any():
        raise UserError("none of the evaluation part's images was scored; calibrate on fewer images")
    result = task_metrics(model, y[rows], probs[rows], cfg)
    result["subgroups"] = flag_small_subgroups(subgroups(model, table[rows], y[rows], probs[rows], cfg))
    plots_for(model, y[rows], probs[rows], result, plots_dir, cfg.evaluate.calibration_bins)
    failures = [
        {"file": row.file, "label": row.label, "status": a.status, "http_status": a.http_status, "error": a.error}
        for row, a in zip(table.itertuples(), answers)
        if a.status != "ok"
    ]
    # counted by kind (the text before the per-image numbers), so the report stays readable on big sets
    warnings = Counter(
        w.split(":")[0] for a in answers if a.status == "ok" for w in (a.response or {}).get("warnings") or []
    )
    evaluation = training_evaluation(model, cfg)
    internal = internal_metrics(model, cfg, evaluation)
    comparison = {**internal, "metrics": compare(internal["metrics"], result)} if internal["available"] else internal
    counts = Counter(a.status for a in answers)
    report = {
        "kind": "external_evaluation",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "endpoint": endpoint,
        "model": {
            **model.stamp(),
            "task": model.task,
            "labels": model.labels,
            "threshold": model.threshold,
            "run_id": model.run_id,
            "training_dataset_hash": model.dataset_hash,
        },
        "data": {
            "description": ext.description,
            "dataset_hash": ext.dataset_hash,
            "n_images": len(table),
            "label_mapping": mapping,
            "notes": [*ext.notes, LOCAL_NAMES_NOTE],
            "labels": {str(k): int(v) for k, v in table["label"].value_counts().sort_index().items()},
        },
        "requests": {
            "sent": scored.sent,
            "from_cache": scored.cached,
            "ok": counts["ok"],
            "refused": counts["refused"],
            "failed": counts["failed"],
        },
        "failures": failures,
        "service_warnings": dict(warnings),
        "out_of_distribution": ood_section(model, table, ok, rows, outside, y, probs, cfg, checked),
        "metrics": result,
        "comparison": comparison,
    }
    if model.task != "binary":
        return report
    thresholds = {"model": model.threshold}
    if calibration is not None:
        try:
            decided = ok & ~outside
            report["site_calibration"] = site_section(table, model, y, probs, ok, decided, calibration, cfg, result)
            thresholds["site"] = report["site_calibration"]["thresholds"]["site"]
        except TooFewInDistribution as exc:  # the report still says what the model did with these films
            report["site_calibration_skipped"] = str(exc)  # said by the CLI with the tables
    report["score_shift"] = score_shift(model, y[rows], probs[rows], cfg, thresholds, plots_dir, evaluation)
    return report


def flag_small_subgroups(groups: dict[str, Any]) -> dict[str, Any]:
    """Mark subgroups with too few positives or negatives (MIN_SUBGROUP_CLASS) to say anything."""
    for values in groups.values():
        for entry in values.values():
            if not entry.get("skipped") and min(entry["n_pos"], entry["n_neg"]) < MIN_SUBGROUP_CLASS:
                entry["too_small"] = f"fewer than {MIN_SUBGROUP_CLASS} positives or negatives: CIs too wide to judge"
    return groups


# --- site calibration and score shift (binary) -----------------------------------------------------


class TooFewInDistribution(UserError):
    """Site calibration needs films the service decides (in distribution) in both parts."""


def site_section(
    table: pd.DataFrame,
    model: EvaluatedModel,
    y: np.ndarray,
    probs: np.ndarray,
    ok: np.ndarray,
    decided: np.ndarray,
    calibration: SiteRequest,
    cfg: "Config",
    at_model_all: dict[str, Any],
) -> dict[str, Any]:
    """The site threshold chosen on the calibration part; both operating points on the evaluation part. Both use
    the ``decided`` films only (scored and in distribution): the threshold is for the films the service decides.
    ``at_model_all``: the model's threshold on every scored film of the evaluation part (reused when all are decided)."""
    chosen = calibration.split.calibration
    cal, ev = decided & chosen, decided & ~chosen
    if len(set(y[cal].tolist())) < 2 or not ev.any():
        raise TooFewInDistribution(
            f"too few films in distribution ({int(cal.sum())} to choose a site threshold, with both labels, and "
            f"{int(ev.sum())} to check it): the service abstains on this site's films, so no threshold is chosen"
        )
    threshold = site.site_threshold(y[cal], probs[cal], calibration.rule)
    at_site_model = dataclasses.replace(model, threshold=threshold)
    if (ev == (ok & ~chosen)).all():  # every scored film decided: the report's own metrics are these
        at_model = {k: v for k, v in at_model_all.items() if k != "subgroups"}
    else:
        at_model = task_metrics(model, y[ev], probs[ev], cfg)
    at_site = task_metrics(at_site_model, y[ev], probs[ev], cfg)
    at_site["subgroups"] = flag_small_subgroups(subgroups(at_site_model, table[ev], y[ev], probs[ev], cfg))
    unit = calibration.split.unit
    return {
        "split": {
            "unit": unit,
            "seed": cfg.project.seed,
            "requested": calibration.requested,
            "calibration": _part(table, chosen, ok & chosen, cal, unit, calibration.split.n_groups[0]),
            "evaluation": _part(table, ~chosen, ok & ~chosen, ev, unit, calibration.split.n_groups[1]),
        },
        "rule": calibration.rule,
        "thresholds": {"model": model.threshold, "site": threshold},
        "operating_points": {"model": at_model, "site": at_site},
        "saved_as": None,
    }


def _part(
    table: pd.DataFrame, rows: np.ndarray, scored: np.ndarray, decided: np.ndarray, unit: str, groups: int
) -> dict[str, Any]:
    labels = table["label"][rows].value_counts().sort_index()
    return {
        "images": int(rows.sum()),
        "scored": int(scored.sum()),
        "in_distribution": int(decided.sum()),
        f"{unit}s": groups,
        "labels": {str(k): int(v) for k, v in labels.items()},
    }


def internal_scores(model: EvaluatedModel, cfg: "Config", evaluation: dict[str, Any] | None) -> dict[str, Any]:
    """The model's internal test labels and scores, as `cxr evaluate` keeps them in evaluation.json: from its
    training run (``evaluation``), else from this project's reports/ when they are of the same model."""
    reasons = []
    if model.run_id and cfg.mlflow.enabled:
        if evaluation is None:
            reasons.append(f"no evaluation.json in the model's training run {model.run_id}")
        elif "test_scores" in evaluation:
            return {"available": True, "source": f"MLflow run {model.run_id}", **evaluation["test_scores"]}
        else:
            reasons.append(f"the evaluation of run {model.run_id} kept no test scores (evaluated before they were)")
    local = Path(cfg.paths.reports) / "evaluation.json"
    if local.exists():
        found = json.loads(local.read_text())
        same = model.run_id is not None and (found.get("model") or {}).get("run_id") == model.run_id
        if same and "test_scores" in found:
            return {"available": True, "source": str(local), **found["test_scores"]}
        reasons.append(f"{local} is of another model or kept no test scores")
    reason = "; ".join(reasons) or "the model has no training run and no local evaluation of it"
    return {"available": False, "reason": f"internal test scores unavailable: {reason}"}


def score_shift(
    model: EvaluatedModel,
    y: np.ndarray,
    probs: np.ndarray,
    cfg: "Config",
    thresholds: dict[str, float],
    plots_dir: Path,
    evaluation: dict[str, Any] | None,
) -> dict[str, Any]:
    """Score distributions per true class, internal test vs external, and the share of each above each
    threshold (negatives above the model's threshold are its false positives), with two plots."""
    internal = internal_scores(model, cfg, evaluation)
    inner = (np.asarray(internal["label"]), np.asarray(internal["score"])) if internal["available"] else None
    bins = cfg.evaluate.calibration_bins
    plots.plot_reliability_shift((y, probs), inner, plots_dir / "calibration_internal_vs_external.png", bins)
    plots.plot_score_shift((y, probs), inner, model.labels, thresholds, plots_dir / "score_shift.png")
    per_class = {}
    for k, label in enumerate(model.labels):
        per_class[label] = {
            "external": _distribution(probs[y == k], thresholds),
            "internal": _distribution(inner[1][inner[0] == k], thresholds) if inner is not None else None,
        }
    return {"internal": {k: v for k, v in internal.items() if k not in ("label", "score")}, "per_class": per_class}


def _distribution(scores: np.ndarray, thresholds: dict[str, float]) -> dict[str, Any] | None:
    if scores.size == 0:
        return None
    q25, median, q75 = (float(v) for v in np.quantile(scores, [0.25, 0.5, 0.75]))
    above = {name: float(np.mean(scores >= t)) for name, t in thresholds.items()}
    return {"n": int(scores.size), "median": median, "q25": q25, "q75": q75, "above_threshold": above}


def predictions_table(ext: ExternalSet, model: EvaluatedModel, answers: list[Answer], ids: FileIds) -> pd.DataFrame:
    """One row per image: what the model said (no paths outside the data folder, no patient data), with the
    file's name and its id (``ids``), as MLflow's copy names it."""
    rows = []
    for row, a in zip(ext.table.itertuples(), answers):
        r = a.response or {}
        rows.append(
            {
                "file": row.file,
                "file_id": ids(row.file),
                "sha256": row.sha256,
                "label": row.label,
                "status": a.status,
                "prediction": json.dumps(r.get("prediction")) if a.status == "ok" else "",
                "in_distribution": (r.get("ood") or {}).get("in_distribution"),
                "ood_score": (r.get("ood") or {}).get("score"),
                "warnings": "; ".join(r.get("warnings") or []),
                **{f"p_{lab}": (r.get("probabilities") or {}).get(lab) for lab in model.labels},
            }
        )
    return pd.DataFrame(rows)


def write_report(report: dict[str, Any], predictions: pd.DataFrame, folder: Path) -> None:
    """external.json, external.html (self-contained, the plots in ``folder/plots`` embedded), predictions.csv."""

    (folder / "external.json").write_text(json.dumps(report, indent=2, allow_nan=False, default=str) + "\n")
    (folder / "external.html").write_text(render(report, sorted((folder / "plots").glob("*.png"))))
    predictions.to_csv(folder / "predictions.csv", index=False)


def without_file_names(
    report: dict[str, Any], predictions: pd.DataFrame, ids: FileIds
) -> tuple[dict[str, Any], pd.DataFrame]:
    """The report and predictions for MLflow: each file name replaced by its id, and the notes saying so."""
    shared = json.loads(json.dumps(report, default=str))  # a deep copy, as external.json holds it
    for failure in shared["failures"]:
        failure["file"] = ids(failure["file"])
    notes = shared["data"]["notes"]
    shared["data"]["notes"] = [MLFLOW_NAMES_NOTE if n == LOCAL_NAMES_NOTE else n for n in notes]
    return shared, predictions.drop(columns="file")


# --- MLflow ---------------------------------------------------------------------------------------


def log_to_mlflow(
    cfg: "Config",
    report: dict[str, Any],
    predictions: pd.DataFrame,
    folder: Path,
    ext: ExternalSet,
    model: EvaluatedModel,
    ids: FileIds,
) -> str | None:
    """An evaluation run next to the model's training run: ``external_*`` metrics, tags naming the
    served version and data, the report (in ``folder``) as artifacts with file names replaced by their
    ``ids``. Returns the run id (None when tracking is off)."""
    tags = {
        "cxr.run_type": "external_evaluation",
        "model_name": str(model.name),
        "model_version": str(model.version),
        "model_uri": str(model.uri),
        "model_run_id": str(model.run_id),
        "external_dataset_hash": ext.dataset_hash,
        "training_dataset_hash": str(model.dataset_hash),
        "endpoint": report["endpoint"],
        "external_data": ext.description[:5000],
    }
    with tracking.run(cfg, name=external_run_name(ext, model), tags=tags) as active:
        if active is None:
            return None
        import mlflow

        values = _metric_values("external_", report["metrics"])
        values |= {f"external_n_{k}": float(v) for k, v in report["requests"].items()}
        for key, entry in report["comparison"].get("metrics", {}).items():
            values[f"internal_test_{key}"] = entry["internal"]["value"]
            values[f"external_drop_{key}"] = entry["drop"]
        values |= _site_values(report.get("site_calibration"))
        values |= _ood_values(report["out_of_distribution"])
        mlflow.set_tag("ood_verdict", report["out_of_distribution"]["verdict"])
        if report.get("site_calibration"):
            mlflow.set_tags(_site_tags(report["site_calibration"]))
        if report.get("site_calibration_skipped"):
            mlflow.set_tag("site_calibration", f"skipped: {report['site_calibration_skipped']}")
        dataset = _mlflow_dataset(ext)
        mlflow.log_input(dataset, context="external_test")
        mlflow.log_metrics(values, model_id=_logged_model_id(model), dataset=dataset)
        with tempfile.TemporaryDirectory() as shared:
            if (folder / "plots").is_dir():
                shutil.copytree(folder / "plots", Path(shared) / "plots")
            write_report(*without_file_names(report, predictions, ids), Path(shared))
            mlflow.log_artifacts(shared, "external")
        return active.info.run_id


def _metric_values(prefix: str, result: dict[str, Any]) -> dict[str, float]:
    """A metrics result as MLflow metrics: each headline value and each interval's ends, under ``prefix``."""
    values = {f"{prefix}{k.replace('/', '_')}": v for k, v in metrics.headline(result).items()}
    for key, entry in result.items():
        if isinstance(entry, dict) and entry.get("ci_low") is not None:
            values[f"{prefix}{key}_ci_low"], values[f"{prefix}{key}_ci_high"] = entry["ci_low"], entry["ci_high"]
    return values


def _ood_values(part: dict[str, Any]) -> dict[str, float]:
    """The share flagged out of distribution, and the metrics on the films in distribution."""
    if not part.get("checked"):
        return {}
    inside = part.get("in_distribution_metrics")
    return {"ood_share": part["share"], "ood_flagged": float(part["flagged"])} | (
        _metric_values("external_in_distribution_", inside) if inside else {}
    )


def _site_values(part: dict[str, Any] | None) -> dict[str, float]:
    """The site operating point's metrics (evaluation part) beside the model threshold's ``external_*``."""
    if not part:
        return {}
    return _metric_values("external_site_", part["operating_points"]["site"]) | {
        "site_threshold": part["thresholds"]["site"],
        "model_threshold": part["thresholds"]["model"],
        "site_n_calibration": float(part["split"]["calibration"]["in_distribution"]),
        "site_n_evaluation": float(part["split"]["evaluation"]["in_distribution"]),
    }


def _site_tags(part: dict[str, Any]) -> dict[str, str]:
    return {
        "site_calibration": "true",
        "site_rule": json.dumps(part["rule"], sort_keys=True),
        "site_split_unit": part["split"]["unit"],
        "site_saved_as": str(part["saved_as"]),
    }


def external_run_name(ext: ExternalSet, model: EvaluatedModel) -> str:
    """What the MLflow UI lists: ``external chest_xray/test: cxr v3`` (a model directory has no version)."""
    served = f"{model.name} v{model.version}" if model.version else str(model.name or "model")
    return f"external {ext.name}: {served}"


def _mlflow_dataset(ext: ExternalSet) -> Any:
    """The external set as an MLflow dataset: content hashes and labels only, never paths or patient data."""
    import mlflow

    cols = [c for c in ("sha256", "label", "view", "sex", "age") if c in ext.table]
    table = ext.table[cols].astype({"age": float} if "age" in cols else {})  # ages may be missing
    return mlflow.data.from_pandas(table, name=f"external {ext.name}", digest=ext.dataset_hash[:32])


def _logged_model_id(model: EvaluatedModel) -> str | None:
    """The registered version's logged model: metrics linked to it show on its page next to the training
    run's test_* metrics. The embedded registry leaves ``model_id`` empty; the source URI names it."""
    entry = registry_version(f"models:/{model.name}/{model.version}") if model.version else None
    if entry is None:
        return None
    source = str(entry.source or "")
    return entry.model_id or (source.removeprefix("models:/") if source.startswith("models:/m-") else None)


# --- the command ----------------------------------------------------------------------------------


def evaluate_external(
    cfg: "Config",
    *,
    data: str | Path | None = None,
    url: str | None = None,
    model: str | Path | None = None,
    out: str | Path = "reports/external",
    concurrency: int = 8,
    timeout: float = 30.0,
    retries: int = 4,
    backoff: float = 0.5,
    transport: "httpx.AsyncBaseTransport | None" = None,
    calibrate: str | float | None = None,
    target_sensitivity: float | None = None,
    save_site: str | None = None,
) -> dict[str, Any]:
    """Score the external set through the service at ``url`` (or in-process with ``model``) and report.

    With ``calibrate`` (a count of images or a fraction), that part of the set chooses a site threshold
    (the model's rule, or ``target_sensitivity``) and the report judges both thresholds on the rest;
    ``save_site`` then stores it on the registered version as the operating point of that name."""
    size = _check_site_options(calibrate, target_sensitivity, save_site)
    if (url is None) == (model is None):
        raise UserError(
            "give either --url (a running cxr service) or --model (models:/NAME@champion or a model "
            "directory, scored in-process)"
        )
    if concurrency < 1 or retries < 0 or timeout <= 0:
        raise UserError("--concurrency must be >= 1, --retries >= 0 and --timeout > 0")
    out = Path(out)
    if url is not None:
        client_kwargs = {"url": url, "timeout": timeout, "retries": retries, "backoff": backoff, "transport": transport}
        evaluated = EvaluatedModel.from_metadata(asyncio.run(_metadata(client_kwargs)))
        endpoint = f"{url.rstrip('/')}/predict"
    else:
        if cfg.mlflow.enabled:
            tracking.configure(cfg)  # models:/ URIs resolve in the configured store
        in_process = load_in_process(model, cfg)
        evaluated = EvaluatedModel.from_metadata(in_process.metadata())
        endpoint = IN_PROCESS
    if size is not None:
        _check_model_for_site(evaluated, save_site, cfg)
    ext = load_external_set(cfg, data, evaluated.task, out / "source")
    log.info("external set: %d images (%s), dataset hash %s", len(ext.table), ext.description, ext.dataset_hash[:12])
    calibration = None
    if size is not None:
        rule = site.site_rule(evaluated.info, target_sensitivity, cfg.evaluate.target_sensitivity)
        split = site.split_for_calibration(ext.table, size, cfg.project.seed)
        calibration = SiteRequest(split, rule, size, save_site)
    cache = ResponseCache(out / CACHE_FILE)
    if url is not None:
        scored = score_remote(ext, evaluated, cache, client_kwargs, concurrency)
    else:
        scored = score_local(ext, evaluated, in_process, cache)
    with atomic_dir(out / REPORT_DIR) as tmp:  # the report appears whole or not at all
        report = build_report(ext, evaluated, scored, cfg, endpoint, tmp / "plots", calibration)
        if calibration is not None and calibration.save_as and "site_calibration" in report:
            _save_site(cfg, report, evaluated, calibration.save_as, ext)
        ids = FileIds()
        predictions = predictions_table(ext, evaluated, scored.answers, ids)
        write_report(report, predictions, tmp)
    report["mlflow_run_id"] = log_to_mlflow(cfg, report, predictions, out / REPORT_DIR, ext, evaluated, ids)
    _record_ood(cfg, report["out_of_distribution"], evaluated, ext)
    return report


def _record_ood(cfg: "Config", ood: dict[str, Any], model: EvaluatedModel, ext: ExternalSet) -> None:
    """The share flagged, on the registered version (best effort: the version may live in another registry)."""
    if not ood.get("checked") or model.version is None or not cfg.mlflow.enabled:
        return
    try:
        record_external_ood(cfg, str(model.name), str(model.version), ext.dataset_hash, ood["share"])
    except Exception as exc:  # a service whose registry is not this store's
        log.warning("the out-of-distribution share was not recorded on %s version %s: %s",
                    model.name, model.version, type(exc).__name__)  # fmt: skip


def _check_site_options(
    calibrate: str | float | None, target_sensitivity: float | None, save_site: str | None
) -> int | float | None:
    """The calibration size, or None without --calibrate (whose companions then make no sense)."""
    if calibrate is None:
        if target_sensitivity is not None or save_site is not None:
            raise UserError("--target-sensitivity and --save-site need --calibrate N (the images that choose it)")
        return None
    if save_site is not None:
        check_site_name(save_site)
    return site.parse_size(calibrate)


def _check_model_for_site(model: EvaluatedModel, save_site: str | None, cfg: "Config") -> None:
    if model.task != "binary":
        raise site.CalibrationError(f"--calibrate chooses one threshold: it needs a binary model, not {model.task}")
    if save_site is not None and (model.version is None or not cfg.mlflow.enabled):
        raise UserError(
            f"--save-site stores the threshold on a registered model version, and {model.uri or 'this model'} is "
            "not one; evaluate models:/NAME@ALIAS (or a service serving one) with mlflow.enabled"
        )


def _save_site(cfg: "Config", report: dict[str, Any], model: EvaluatedModel, name: str, ext: ExternalSet) -> None:
    part = report["site_calibration"]
    n_calibration = part["split"]["calibration"]["in_distribution"]
    point = site.operating_point_tag(part["thresholds"]["site"], part["rule"], n_calibration, ext.dataset_hash)
    part["saved_as"] = save_operating_point(cfg, str(model.name), str(model.version), name, point)
    log.info("saved the site threshold as %s on %s version %s", part["saved_as"], model.name, model.version)


async def _metadata(client_kwargs: dict[str, Any]) -> dict[str, Any]:
    async with ServiceClient(**client_kwargs) as client:
        return await client.metadata()
