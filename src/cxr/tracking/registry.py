"""The MLflow model registry: register a trained model, gate its promotion to ``champion``, roll back.

Aliases only (the stages API is deprecated). Every alias move is recorded as a registered-model tag
``promotion.NNNN`` holding JSON (who, when, from, to, why), so the history lives next to the model in
whatever registry the team uses, and ``rollback`` can walk it back.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr.errors import UserError
from cxr.models.card import ModelCard
from cxr.models.predictor import CARD_FILE
from cxr.tracking import runs as tracking

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from cxr.config import Config

log = logging.getLogger(__name__)

HISTORY_PREFIX = "promotion."
# Run metrics copied onto the version as tags, so `cxr models` and the UI show them without the run.
METRIC_TAGS = {
    "val_auroc": ("eval_val_auroc", "best_val_auroc"),
    "val_auroc_augmented": ("best_val_auroc_augmented",),  # a tuning trial's objective
    "test_auroc": ("test_auroc",),
    "test_accuracy": ("test_accuracy",),
    "test_sensitivity": ("test_sensitivity",),
    "test_specificity": ("test_specificity",),
}
RUN_TAGS = ("git_commit", "git_dirty", "dataset_hash", "data_source", "synthetic_data", "task")


class RegistryError(UserError):
    """A registry request that cannot be done as asked."""


class PromotionRefused(RegistryError):
    """The candidate does not beat the champion (or is not comparable with it)."""


@dataclass
class Decision:
    promote: bool
    reason: str


def _client(cfg: "Config") -> "MlflowClient":
    from mlflow import MlflowClient

    tracking.configure(cfg)
    return MlflowClient()


def _model_dir_run_id(cfg: "Config") -> str:
    card_path = Path(cfg.paths.model) / CARD_FILE
    if not card_path.exists():
        raise RegistryError(f"no trained model at {cfg.paths.model}; train one (`cxr train`) or pass --run-id")
    run_id = ModelCard.from_json(card_path.read_text(), str(card_path)).training.run_id
    if not run_id:
        raise RegistryError(f"the model at {cfg.paths.model} was trained without MLflow (mlflow.enabled=false)")
    return run_id


def register(cfg: "Config", run_id: str | None = None) -> "ModelVersion":
    """A new version of ``mlflow.registered_model`` from a training run (default: the one behind paths.model)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    run_id = run_id or _model_dir_run_id(cfg)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise RegistryError(
            f"run {run_id} is not in the tracking store {mlflow.get_tracking_uri()}: {exc.message}"
        ) from None
    model_uri = run.data.tags.get("model_uri")
    if not model_uri:
        raise RegistryError(f"run {run_id} logged no model (trained with log_model off?); retrain with `cxr train`")
    where = f"runs:/{run_id}/{tracking.MODEL_CARD_ARTIFACT}"
    card = ModelCard.from_json(mlflow.artifacts.load_text(where), where)
    tags = {
        "run_id": run_id,
        "arch": card.arch,
        "threshold": json.dumps(card.threshold),
        "labels": json.dumps(card.labels),
    }
    tags |= {k: run.data.tags[k] for k in RUN_TAGS if k in run.data.tags}
    for tag, names in METRIC_TAGS.items():
        value = next((run.data.metrics[n] for n in names if n in run.data.metrics), None)
        if value is not None:
            tags[tag] = f"{value:.6f}"
    name = cfg.mlflow.registered_model
    version = mlflow.register_model(model_uri, name, tags=tags)
    client.update_model_version(
        name,
        version.version,
        description=f"{tags['arch']} trained in run {run_id} on {tags.get('data_source', '?')} "
        f"data {tags.get('dataset_hash', '?')[:12]}",
    )
    return client.get_model_version(name, version.version)


def compare(candidate: "ModelVersion", champion: "ModelVersion | None", margin: float) -> Decision:
    """The promotion gate: better validation AUROC by ``margin`` on the same validation data."""
    if champion is None:
        return Decision(True, "no current champion")
    if str(candidate.version) == str(champion.version):
        return Decision(False, f"version {candidate.version} already is the champion")
    c_hash, h_hash = candidate.tags.get("dataset_hash"), champion.tags.get("dataset_hash")
    if not c_hash or c_hash != h_hash:
        return Decision(
            False,
            f"not comparable: candidate was validated on data {str(c_hash)[:12]}, the champion "
            f"(version {champion.version}) on {str(h_hash)[:12]}; retrain on the same prepared data",
        )
    c_auc, h_auc = _float_tag(candidate, "val_auroc"), _float_tag(champion, "val_auroc")
    if c_auc is None or h_auc is None:
        return Decision(False, "validation AUROC missing from the version tags; register versions with `cxr register`")
    if c_auc > h_auc + margin:
        return Decision(
            True, f"val AUROC {c_auc:.4f} beats champion v{champion.version} {h_auc:.4f} by more than {margin}"
        )
    return Decision(
        False,
        f"val AUROC {c_auc:.4f} does not beat champion v{champion.version} {h_auc:.4f} "
        f"by more than the margin {margin}",
    )


def _short(value: str | None) -> str | None:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return value


def _float_tag(version: "ModelVersion", key: str) -> float | None:
    value = version.tags.get(key)
    return float(value) if value not in (None, "") else None


def champion(cfg: "Config", client: "MlflowClient | None" = None) -> "ModelVersion | None":
    from mlflow.exceptions import MlflowException

    client = client or _client(cfg)
    try:
        return client.get_model_version_by_alias(cfg.mlflow.registered_model, cfg.registry.alias)
    except MlflowException:
        return None


def _version(client: "MlflowClient", name: str, version: str | int) -> "ModelVersion":
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"registered model {name!r} has no version {version}; see `cxr models`") from None


def promote(cfg: "Config", version: str | int, *, force: bool = False, reason: str | None = None) -> Decision:
    """Move the alias to ``version`` if it passes the gate (or ``force``); raises PromotionRefused otherwise."""
    client = _client(cfg)
    name = cfg.mlflow.registered_model
    candidate = _version(client, name, version)
    current = champion(cfg, client)
    decision = compare(candidate, current, cfg.registry.promote_margin)
    if not decision.promote:
        if not force or (current is not None and str(current.version) == str(candidate.version)):
            raise PromotionRefused(
                f"version {candidate.version} not promoted: {decision.reason}"
                + ("" if force else " (--force overrides)")
            )
        decision = Decision(True, f"forced ({reason or 'no reason given'}); gate said: {decision.reason}")
    _move_alias(cfg, client, current, candidate, "promote", decision.reason, forced=force)
    return decision


def rollback(cfg: "Config", *, reason: str | None = None) -> "ModelVersion":
    """Return the alias to the version that held it before the current champion's last promotion."""
    client = _client(cfg)
    current = champion(cfg, client)
    if current is None:
        raise RegistryError(f"{cfg.mlflow.registered_model!r} has no {cfg.registry.alias!r}: nothing to roll back")
    events = history(cfg, client)
    undone = {e["undoes"] for e in events if e.get("undoes") is not None}
    for event in reversed(events):
        if event["action"] == "promote" and event["id"] not in undone and event["to"] == str(current.version):
            if event["from"] is None:
                raise RegistryError(f"version {current.version} was the first {cfg.registry.alias}: no earlier holder")
            previous = _version(client, cfg.mlflow.registered_model, event["from"])
            _move_alias(
                cfg,
                client,
                current,
                previous,
                "rollback",
                reason or f"rollback of promotion {event['id']}",
                undoes=event["id"],
            )
            return previous
    raise RegistryError(
        f"no recorded promotion to version {current.version}: cannot tell who held "
        f"{cfg.registry.alias!r} before (set it with `cxr promote VERSION --force`)"
    )


def _move_alias(
    cfg: "Config",
    client: "MlflowClient",
    current: "ModelVersion | None",
    target: "ModelVersion",
    action: str,
    why: str,
    **extra: Any,
) -> None:
    name = cfg.mlflow.registered_model
    events = history(cfg, client)
    event = {
        "id": len(events) + 1,
        "action": action,
        "alias": cfg.registry.alias,
        "from": str(current.version) if current else None,
        "to": str(target.version),
        "why": why,
        "who": f"{getpass.getuser()}@{socket.gethostname()}",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **extra,
    }
    client.set_registered_model_alias(name, cfg.registry.alias, target.version)
    client.set_registered_model_tag(name, f"{HISTORY_PREFIX}{event['id']:04d}", json.dumps(event))


def history(cfg: "Config", client: "MlflowClient | None" = None) -> list[dict[str, Any]]:
    """Every alias move, oldest first."""
    from mlflow.exceptions import MlflowException

    client = client or _client(cfg)
    try:
        model = client.get_registered_model(cfg.mlflow.registered_model)
    except MlflowException:
        return []
    events = [json.loads(v) for k, v in model.tags.items() if k.startswith(HISTORY_PREFIX)]
    return sorted(events, key=lambda e: e["id"])


def versions(cfg: "Config") -> list[dict[str, Any]]:
    """Versions (newest first) with their aliases and metrics, for `cxr models`."""
    client = _client(cfg)
    name = cfg.mlflow.registered_model
    found = client.search_model_versions(f"name = '{name}'")
    aliases: dict[str, list[str]] = {}
    try:
        for alias, version in client.get_registered_model(name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
    except Exception:  # no such model yet: no aliases
        pass
    rows = []
    for v in sorted(found, key=lambda v: int(v.version), reverse=True):
        rows.append(
            {
                "version": str(v.version),
                "aliases": sorted(aliases.get(str(v.version), [])),
                "created": dt.datetime.fromtimestamp(v.creation_timestamp / 1000, dt.UTC).isoformat(timespec="seconds"),
                "run_id": v.run_id or v.tags.get("run_id"),
                "arch": v.tags.get("arch"),
                **{k: _short(v.tags.get(k)) for k in ("val_auroc", "test_auroc", "test_accuracy", "threshold")},
                "dataset_hash": (v.tags.get("dataset_hash") or "")[:12],
            }
        )
    return rows


# --- named operating points (site thresholds) ------------------------------------------------------

OPERATING_POINT_PREFIX = "operating_point."
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_site_name(site: str) -> str:
    if not SITE_NAME.fullmatch(site):
        raise RegistryError(f"site name {site!r}: use 1-64 letters, digits, '-' or '_' (e.g. hospital_b)")
    return site


def save_operating_point(cfg: "Config", name: str, version: str, site: str, point: dict[str, Any]) -> str:
    """Store ``point`` (threshold, rule, ...) as the version tag ``operating_point.SITE``; returns the tag key."""
    client = _client(cfg)
    _version(client, name, version)
    key = OPERATING_POINT_PREFIX + check_site_name(site)
    client.set_model_version_tag(name, str(version), key, json.dumps(point, sort_keys=True))
    return key


def operating_points(version: "ModelVersion") -> dict[str, dict[str, Any]]:
    """The named operating points stored on a version, by site name (unreadable tags are left out)."""
    points = {}
    for key, value in (version.tags or {}).items():
        if not key.startswith(OPERATING_POINT_PREFIX):
            continue
        try:
            point = json.loads(value)
            points[key[len(OPERATING_POINT_PREFIX) :]] = {**point, "threshold": float(point["threshold"])}
        except (ValueError, TypeError, KeyError):
            log.warning("version %s: tag %s is not an operating point; ignored", version.version, key)
    return points
