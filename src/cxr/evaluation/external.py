"""evaluate_external: a model on another hospital's data, through the deployed service's HTTP API.

Every image is sent to ``{url}/predict`` (bounded concurrency, retries, a progress bar); answers are
cached in the output folder so an interrupted run resumes. The report holds the metrics with bootstrap
CIs at the model's own threshold, subgroups, plots, every refused or failed file, and a comparison with
the model's internal test metrics, as JSON plus one self-contained HTML file, and is logged to MLflow as
an evaluation run tagged with the served model version. With ``model=`` (``models:/NAME@champion`` or a
model directory) the same happens in-process, through the service's own answer function (cxr.serving.served),
when no service is running.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cxr.errors import UserError
from cxr.evaluation import metrics
from cxr.evaluation.evaluate import plots_for, subgroups, task_metrics
from cxr.evaluation.external_data import ExternalSet, load_external_set, map_labels, targets
from cxr.evaluation.report_html import render
from cxr.evaluation.response_cache import ResponseCache, cache_key
from cxr.fsutil import atomic_dir
from cxr.progress import progress_bar
from cxr.serving.client import Answer, ServiceClient
from cxr.serving.served import ServedModel
from cxr.tracking import runs as tracking
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


def internal_metrics(model: EvaluatedModel, cfg: "Config") -> dict[str, Any]:
    """The model's own test-set metrics: the evaluation report of its training run (with CIs), else the
    run's ``test_*`` metrics, else the registered version's tags, else what /metadata carries."""
    found: dict[str, Any] | None = None
    source = None
    if model.run_id and cfg.mlflow.enabled:
        found, source = _from_run(model.run_id, cfg)
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


def _from_run(run_id: str, cfg: "Config") -> tuple[dict[str, Any] | None, str | None]:
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
    try:
        report = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/evaluation/evaluation.json"))
        test = report["splits"]["test"]
        return (
            {k: v for k, v in test.items() if isinstance(v, dict) and "value" in v},
            f"MLflow run {run_id}: evaluation/evaluation.json (test split)",
        )
    except (MlflowException, OSError, KeyError, ValueError):
        pass
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


def build_report(
    ext: ExternalSet, model: EvaluatedModel, scored: Scored, cfg: "Config", endpoint: str, plots_dir: Path
) -> dict[str, Any]:
    table, answers = ext.table, scored.answers
    mapping = map_labels(table["label"].tolist(), model.labels, model.task)
    y = targets(table["label"], model.labels, model.task)
    ok = np.array([a.status == "ok" for a in answers])
    if not ok.any():
        first = next((a.error for a in answers if a.error), "no answer")
        raise UserError(
            f"none of the {len(answers)} images was scored ({Counter(a.status for a in answers)}); first error: {first}"
        )
    probs = probabilities([a.response for a in answers if a.status == "ok"], model)
    result = task_metrics(model, y[ok], probs, cfg)
    result["subgroups"] = subgroups(model, table[ok], y[ok], probs, cfg)
    plots_for(model, y[ok], probs, result, plots_dir, cfg.evaluate.calibration_bins)
    failures = [
        {"file": row.file, "label": row.label, "status": a.status, "http_status": a.http_status, "error": a.error}
        for row, a in zip(table.itertuples(), answers)
        if a.status != "ok"
    ]
    # counted by kind (the text before the per-image numbers), so the report stays readable on big sets
    warnings = Counter(
        w.split(":")[0] for a in answers if a.status == "ok" for w in (a.response or {}).get("warnings") or []
    )
    internal = internal_metrics(model, cfg)
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
            "notes": ext.notes,
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
        "metrics": result,
        "comparison": comparison,
    }
    return report


def predictions_table(ext: ExternalSet, model: EvaluatedModel, answers: list[Answer]) -> pd.DataFrame:
    """One row per image: what the model said (no paths outside the data folder, no patient data)."""
    rows = []
    for row, a in zip(ext.table.itertuples(), answers):
        r = a.response or {}
        rows.append(
            {
                "file": row.file,
                "sha256": row.sha256,
                "label": row.label,
                "status": a.status,
                "prediction": json.dumps(r.get("prediction")) if a.status == "ok" else "",
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


# --- MLflow ---------------------------------------------------------------------------------------


def log_to_mlflow(
    cfg: "Config", report: dict[str, Any], folder: Path, ext: ExternalSet, model: EvaluatedModel
) -> str | None:
    """An evaluation run next to the model's training run: ``external_*`` metrics, tags naming the
    served version and data, the report as artifacts. Returns the run id (None when tracking is off)."""
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

        values = {f"external_{k.replace('/', '_')}": v for k, v in metrics.headline(report["metrics"]).items()}
        for key, entry in report["metrics"].items():
            if isinstance(entry, dict) and entry.get("ci_low") is not None:
                values[f"external_{key}_ci_low"], values[f"external_{key}_ci_high"] = entry["ci_low"], entry["ci_high"]
        values |= {f"external_n_{k}": float(v) for k, v in report["requests"].items()}
        for key, entry in report["comparison"].get("metrics", {}).items():
            values[f"internal_test_{key}"] = entry["internal"]["value"]
            values[f"external_drop_{key}"] = entry["drop"]
        dataset = _mlflow_dataset(ext)
        mlflow.log_input(dataset, context="external_test")
        mlflow.log_metrics(values, model_id=_logged_model_id(model), dataset=dataset)
        mlflow.log_artifacts(str(folder), "external")
        return active.info.run_id


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
) -> dict[str, Any]:
    """Score the external set through the service at ``url`` (or in-process with ``model``) and report."""
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
    ext = load_external_set(cfg, data, evaluated.task, out / "source")
    log.info("external set: %d images (%s), dataset hash %s", len(ext.table), ext.description, ext.dataset_hash[:12])
    cache = ResponseCache(out / CACHE_FILE)
    if url is not None:
        scored = score_remote(ext, evaluated, cache, client_kwargs, concurrency)
    else:
        scored = score_local(ext, evaluated, in_process, cache)
    with atomic_dir(out / REPORT_DIR) as tmp:  # the report appears whole or not at all
        report = build_report(ext, evaluated, scored, cfg, endpoint, tmp / "plots")
        write_report(report, predictions_table(ext, evaluated, scored.answers), tmp)
    report["mlflow_run_id"] = log_to_mlflow(cfg, report, out / REPORT_DIR, ext, evaluated)
    return report


async def _metadata(client_kwargs: dict[str, Any]) -> dict[str, Any]:
    async with ServiceClient(**client_kwargs) as client:
        return await client.metadata()
