"""The MLflow model registry: register a trained model, gate its promotion to ``champion``, roll back.

Aliases only (the stages API is deprecated). A version records the evaluation its run came with (tags the
gate judges) and carries a Markdown model card as its description. The gate refuses a version that fails
one of its rules (:class:`Rule`), naming the rule; ``--force`` with a reason overrides. Every alias move is
recorded as a registered-model tag ``promotion.ID`` holding JSON (who, when, from, to, why, forced and the
rule it overrode), so the history lives next to the model in whatever registry the team uses, and
``rollback`` can walk it back.

Concurrent ``promote``/``rollback`` commands take turns: each reads the champion and the history, decides, moves
the alias and records the move while holding the store's promotion lock (a file lock beside a sqlite or file
store; for a remote registry, which offers no lock, a registered model created as a mutex). Each entry's ID is
unique and sorts after every earlier one (UTC time, nudged past the last entry's, plus a random tail), so no
entry can overwrite another; entries numbered ``promotion.0001``... by older versions of cxr sort first.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import re
import secrets
import socket
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr.errors import UserError
from cxr.models.card import ModelCard
from cxr.models.predictor import CARD_FILE
from cxr.tracking import runs as tracking
from cxr.tracking.onnx_artifacts import ONNX_TAG, log_onnx
from cxr.tracking.promotion_lock import promotion_lock
from cxr.tracking.version_card import describe

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from cxr.config import Config

log = logging.getLogger(__name__)

HISTORY_PREFIX = "promotion."
ID_TIME = "%Y%m%dT%H%M%S.%fZ"  # a history entry's ID: this UTC time, then "-" and random hex
EXTERNAL_OOD_PREFIX = "external_ood_share."  # + an external set's dataset hash: the share it had out of distribution
# Training-run metrics put on the version when no evaluation gives the number (a tuning trial's objective).
RUN_METRIC_TAGS = {
    "val_auroc": ("best_val_auroc",),
    "val_auroc_augmented": ("best_val_auroc_augmented",),
}
RUN_TAGS = ("git_commit", "git_dirty")
TEST_METRICS = ("accuracy", "sensitivity", "specificity")  # test numbers shown beside the AUROC in `cxr models`

# The promotion gate's numbers; every refusal names the rule (below) that refused.
MIN_SCORE_STD = 0.01  # validation probabilities spread less than a point apart say the same thing of every patient
CHANCE_AUROC = 0.5  # an AUROC interval reaching 0.5 has not shown the model ranks cases better than a coin


class Rule(StrEnum):
    """The gate's rules, by the name a refusal, the history and the version's card show."""

    ALREADY_CHAMPION = "already-champion"  # nothing to move (not overridable)
    NEVER_EVALUATED = "never-evaluated"  # registered without `cxr evaluate` on the data it was validated on
    NEAR_CONSTANT = "near-constant-scores"  # validation probability std below MIN_SCORE_STD
    SINGLE_CLASS = "single-predicted-class"  # every validation image gets the same prediction at the threshold
    CHANCE = "auroc-ci-includes-chance"  # the validation AUROC CI does not lie above CHANCE_AUROC
    OTHER_DATA = "different-data"  # validated on other data than the champion: numbers not comparable
    NOT_BETTER = "does-not-beat-champion"  # validation AUROC not above the champion's by registry.promote_margin
    NO_OOD_CHECK = "no-ood-check"  # no out-of-distribution check, with registry.require_ood (else a warning)


class RegistryError(UserError):
    """A registry request that cannot be done as asked."""


class PromotionRefused(RegistryError):
    """The candidate fails a rule of the gate (or is not comparable with the champion)."""


@dataclass
class Decision:
    promote: bool
    reason: str
    rule: Rule | None = None  # the rule that refused (None when the gate passes)


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


def _logged_evaluation(run_id: str) -> dict[str, Any] | None:
    """The evaluation `cxr evaluate` logged to the run (None if it never ran)."""
    try:
        report = tracking.logged_evaluation(run_id)
    except ValueError:  # not JSON: refused below like any other malformed report
        report = {}
    if report is None:
        return None
    where = f"runs:/{run_id}/{tracking.EVALUATION_ARTIFACT}"
    if not isinstance(report, dict) or not isinstance(report.get("splits"), dict) or not report.get("data"):
        raise RegistryError(f"{where} is not an evaluation report; run `cxr evaluate` again")
    return report


def _auroc(result: dict[str, Any]) -> dict[str, Any]:
    """The split's AUROC entry: binary ``auroc``, or ``macro_auroc`` for multiclass/multilabel."""
    entry = result.get("auroc") or result.get("macro_auroc")
    return entry if isinstance(entry, dict) else {}


def evaluation_tags(report: dict[str, Any] | None) -> dict[str, str]:
    """What the gate judges, from the evaluation the version was registered with."""
    if report is None:
        return {"evaluated": "false"}
    tags = {"evaluated": "true", "eval_dataset_hash": str(report["data"].get("dataset_hash"))}
    for split, result in report["splits"].items():
        auc = _auroc(result)
        spread = result.get("scores") or {}
        numbers = {
            f"{split}_auroc": auc.get("value"),
            f"{split}_auroc_ci_low": auc.get("ci_low"),
            f"{split}_auroc_ci_high": auc.get("ci_high"),
            f"{split}_score_std": spread.get("std"),
            f"{split}_positive_share": spread.get("predicted_positive_share"),
        }
        if split == "test":
            numbers |= {f"test_{k}": (result.get(k) or {}).get("value") for k in TEST_METRICS}
        tags |= {k: f"{v:.6f}" for k, v in numbers.items() if v is not None}
        if spread.get("distinct_predictions") is not None:
            tags[f"{split}_distinct_predictions"] = str(spread["distinct_predictions"])
    return tags


WEIGHTS_TAG = "weights_sha256"  # the service refuses a version whose stored weights no longer match it


def version_tags(
    run_id: str, card: ModelCard, run_tags: dict[str, str], run_metrics: dict[str, float], report: Any
) -> dict[str, str]:
    """The version's tags: the model card's facts, the run's lineage, and the evaluation it came with."""
    tags = {
        "run_id": run_id,
        "arch": card.arch,
        "task": card.task,
        "labels": json.dumps(card.labels),
        "threshold": json.dumps(card.threshold),
        "threshold_method": str(card.threshold_method),
        "dataset_hash": card.training.dataset_hash,
        "data_source": card.training.source,
        "synthetic_data": str(card.training.synthetic).lower(),
        "ood_method": card.ood.method if card.ood else "none",
    }
    if card.weights_sha256:
        tags[WEIGHTS_TAG] = card.weights_sha256
    if card.ood:
        tags |= {"ood_threshold": f"{card.ood.threshold:.6f}", "ood_val_pass_rate": f"{card.ood.val_pass_rate:.4f}"}
    tags |= {k: run_tags[k] for k in RUN_TAGS if k in run_tags}
    for tag, names in RUN_METRIC_TAGS.items():
        value = next((run_metrics[n] for n in names if n in run_metrics), None)
        if value is not None:
            tags[tag] = f"{value:.6f}"
    return tags | evaluation_tags(report)


def register(cfg: "Config", run_id: str | None = None) -> "ModelVersion":
    """A new version of ``mlflow.registered_model`` from a training run (default: the one behind paths.model).

    The version records the evaluation the run came with (tags the gate judges) and carries a model card
    in Markdown as its description.
    """
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
    report = _logged_evaluation(run_id)
    tags = version_tags(run_id, card, run.data.tags, run.data.metrics, report)
    onnx_sha256 = log_onnx(client, model_uri)  # the graph travels with the version's artifacts
    tags |= {ONNX_TAG: onnx_sha256} if onnx_sha256 else {}
    name = cfg.mlflow.registered_model
    same = _same_registration(client, name, tags)
    if same is not None:
        log.info("run %s with this evaluation already is %s version %s", run_id, name, same.version)
        return same
    version = mlflow.register_model(model_uri, name, tags=tags)
    findings = [f"rule {d.rule}: {d.reason}" for d in candidate_checks(tags)]
    description = describe(name, str(version.version), card, tags, report, findings)
    client.update_model_version(name, version.version, description=description)
    return client.get_model_version(name, version.version)


def _same_registration(client: "MlflowClient", name: str, tags: dict[str, str]) -> "ModelVersion | None":
    """The version that already holds this run with this evaluation: registering twice adds no duplicate."""
    found = client.search_model_versions(f"name = '{name}'")
    return next((v for v in found if all(v.tags.get(k) == value for k, value in tags.items())), None)


def _refuse(rule: Rule, why: str) -> Decision:
    return Decision(False, why, rule)


def _evaluated(tags: dict[str, str]) -> Decision | None:
    if tags.get("evaluated") != "true":
        return _refuse(
            Rule.NEVER_EVALUATED,
            "registered without an evaluation: run `cxr evaluate` on its model, then register again",
        )
    trained, evaluated = tags.get("dataset_hash"), tags.get("eval_dataset_hash")
    if trained != evaluated:
        return _refuse(
            Rule.NEVER_EVALUATED,
            f"evaluated on data {str(evaluated)[:12]}, not on the data it was trained and validated on "
            f"({str(trained)[:12]}): evaluate it on its own prepared data, then register again",
        )
    return None


def _spread(tags: dict[str, str]) -> Decision | None:
    std = _float_tag(tags, "val_score_std")
    if std is None:
        return _refuse(
            Rule.NEAR_CONSTANT,
            "its evaluation recorded no validation scores (no val split, or an older cxr): evaluate, register again",
        )
    if std < MIN_SCORE_STD:
        return _refuse(
            Rule.NEAR_CONSTANT, f"validation probabilities are near-constant (std {std:.4g} < {MIN_SCORE_STD})"
        )
    if tags.get("val_distinct_predictions") == "1":
        return _refuse(
            Rule.SINGLE_CLASS,
            f"every validation image gets the same prediction at its threshold {tags.get('threshold')}",
        )
    return None


def _above_chance(tags: dict[str, str]) -> Decision | None:
    auc = _float_tag(tags, "val_auroc")
    low, high = _float_tag(tags, "val_auroc_ci_low"), _float_tag(tags, "val_auroc_ci_high")
    if auc is None or low is None or high is None:
        return _refuse(
            Rule.CHANCE,
            "no validation AUROC confidence interval recorded (evaluate.bootstrap=0, or one class in val): "
            "evaluate with bootstrap, register again",
        )
    if low <= CHANCE_AUROC:
        return _refuse(
            Rule.CHANCE,
            f"validation AUROC {auc:.4f} has CI [{low:.4f}, {high:.4f}], which does not lie above chance ({CHANCE_AUROC})",
        )
    return None


def candidate_checks(tags: dict[str, str]) -> list[Decision]:
    """The rules a version must pass on its own, whatever the champion: each failing one's refusal."""
    checks = [_evaluated(tags)]
    if checks[0] is None:  # the score rules read an evaluation
        checks += [_spread(tags), _above_chance(tags)]
    return [c for c in checks if c is not None]


def compare(candidate: "ModelVersion", champion: "ModelVersion | None", margin: float) -> Decision:
    """The promotion gate: a healthy evaluated model, better than the champion by ``margin`` on the same data."""
    if champion is not None and str(candidate.version) == str(champion.version):
        return _refuse(Rule.ALREADY_CHAMPION, f"version {candidate.version} already is the champion")
    refusals = candidate_checks(candidate.tags)
    if refusals:
        return refusals[0]
    if champion is None:
        return Decision(True, "no current champion; the candidate passes the checks")
    c_hash, h_hash = candidate.tags.get("dataset_hash"), champion.tags.get("dataset_hash")
    if not c_hash or c_hash != h_hash:
        return _refuse(
            Rule.OTHER_DATA,
            f"not comparable: candidate was validated on data {str(c_hash)[:12]}, the champion "
            f"(version {champion.version}) on {str(h_hash)[:12]}; retrain on the same prepared data",
        )
    c_auc, h_auc = _float_tag(candidate.tags, "val_auroc"), _float_tag(champion.tags, "val_auroc")
    if h_auc is None:
        return _refuse(
            Rule.NOT_BETTER, f"champion v{champion.version} has no validation AUROC to beat; promote with --force"
        )
    if c_auc > h_auc + margin:
        return Decision(
            True, f"val AUROC {c_auc:.4f} beats champion v{champion.version} {h_auc:.4f} by more than {margin}"
        )
    return _refuse(
        Rule.NOT_BETTER,
        f"val AUROC {c_auc:.4f} does not beat champion v{champion.version} {h_auc:.4f} "
        f"by more than the margin {margin}",
    )


def _short(value: str | None) -> str | None:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return value


def _interval(tags: dict[str, str]) -> str | None:
    low, high = _short(tags.get("val_auroc_ci_low")), _short(tags.get("val_auroc_ci_high"))
    return f"[{low}, {high}]" if low and high else None


def _float_tag(tags: dict[str, str], key: str) -> float | None:
    value = tags.get(key)
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
    """Move the alias to ``version`` if it passes the gate; raises PromotionRefused otherwise.

    ``force`` with a ``reason`` overrides a refusal (not "already champion"); the history records both.
    """
    client = _client(cfg)
    name = cfg.mlflow.registered_model
    with promotion_lock(client, name):  # the champion judged against is the one the alias still holds when moved
        candidate = _version(client, name, version)
        current = champion(cfg, client)
        decision = _decide(cfg, candidate, current, force, reason)
        overrode = decision.rule  # set only on a forced decision: the rule it overrides
        extra = {"forced": overrode is not None, "overrode": None if overrode is None else str(overrode)}
        _move_alias(cfg, client, current, candidate, "promote", decision.reason, **extra)
    return decision


def _decide(
    cfg: "Config", candidate: "ModelVersion", current: "ModelVersion | None", force: bool, reason: str | None
) -> Decision:
    """The gate's decision, or the forced one (with the rule it overrides); raises when the move is refused."""
    decision = compare(candidate, current, cfg.registry.promote_margin)
    if decision.promote:
        decision = ood_check(candidate, cfg.registry.require_ood) or decision
    if decision.promote:
        return decision
    overridable = decision.rule is not Rule.ALREADY_CHAMPION
    if not force or not overridable:
        hint = "; `--force --reason WHY` overrides, on the record" if overridable and not force else ""
        raise PromotionRefused(
            f"version {candidate.version} not promoted (rule {decision.rule}): {decision.reason}{hint}"
        )
    if not reason:
        raise RegistryError(
            f"--force needs --reason: version {candidate.version} fails rule {decision.rule}, and the "
            "history keeps why it was promoted anyway"
        )
    return Decision(True, f"forced ({reason}); rule {decision.rule} refused: {decision.reason}", decision.rule)


def ood_check(candidate: "ModelVersion", required: bool) -> Decision | None:
    """A refusal when the version has no out-of-distribution check and one is required; else a warning, or None."""
    if candidate.tags.get("ood_method", "none") != "none":
        return None
    why = (
        f"version {candidate.version} has no out-of-distribution check: the service will decide every film, "
        "however unlike its training films"
    )
    if required:
        return _refuse(Rule.NO_OOD_CHECK, why + " (registry.require_ood is on)")
    log.warning("%s (set registry.require_ood to refuse such versions)", why)
    return None


def record_external_ood(cfg: "Config", name: str, version: str, dataset_hash: str, share: float) -> str:
    """The share of an external set flagged out of distribution, as version tag ``external_ood_share.HASH``."""
    client = _client(cfg)
    key = f"{EXTERNAL_OOD_PREFIX}{dataset_hash[:12]}"
    client.set_model_version_tag(name, str(version), key, f"{share:.4f}")
    return key


def rollback(cfg: "Config", *, reason: str | None = None) -> "ModelVersion":
    """Return the alias to the version that held it before the promotion that put the current champion there."""
    client = _client(cfg)
    name, alias = cfg.mlflow.registered_model, cfg.registry.alias
    with promotion_lock(client, name):
        current = champion(cfg, client)
        if current is None:
            raise RegistryError(f"{name!r} has no {alias!r}: nothing to roll back")
        event = standing_promotion(history(cfg, client), alias, str(current.version))
        if event["from"] is None:
            raise RegistryError(f"version {current.version} was the first {alias}: no earlier holder")
        previous = _version(client, name, event["from"])
        why = reason or f"rollback of promotion {event['id']}"
        _move_alias(cfg, client, current, previous, "rollback", why, undoes=event["id"])
    return previous


def standing_promotion(events: list[dict[str, Any]], alias: str, current: str) -> dict[str, Any]:
    """The promotion that put ``current`` on ``alias``: the latest one of that alias that no rollback undid.

    Promotions stack and a rollback pops the top one, so the top must have put the current holder there; if it
    did not, the alias was moved outside cxr and the history cannot say what to return to.
    """
    moves = [e for e in events if e.get("alias", alias) == alias]
    undone = {e["undoes"] for e in moves if e.get("undoes") is not None}
    standing = [e for e in moves if e["action"] == "promote" and e["id"] not in undone]
    if not standing:
        raise RegistryError(
            f"no recorded promotion to version {current}: cannot tell who held {alias!r} before "
            "(set it with `cxr promote VERSION --force`)"
        )
    top = standing[-1]
    if top["to"] != current:
        raise RegistryError(
            f"{alias!r} is on version {current}, but its last recorded promotion ({top['id']}) put version "
            f"{top['to']} there: the alias was moved outside `cxr promote`, so rollback cannot tell what to return "
            "to (set it with `cxr promote VERSION --force`)"
        )
    return top


def _move_alias(
    cfg: "Config",
    client: "MlflowClient",
    current: "ModelVersion | None",
    target: "ModelVersion",
    action: str,
    why: str,
    **extra: Any,
) -> None:
    """Move the alias from ``current`` to ``target`` and record it; call with the promotion lock held."""
    name, alias = cfg.mlflow.registered_model, cfg.registry.alias
    _check_holder(cfg, client, current, "before moving it; nothing changed, run the command again")
    event_id = new_event_id(history(cfg, client))
    event = {
        "id": event_id,
        "action": action,
        "alias": alias,
        "from": str(current.version) if current else None,
        "to": str(target.version),
        "why": why,
        "who": f"{getpass.getuser()}@{socket.gethostname()}",
        "when": _id_time(event_id).isoformat(timespec="seconds"),
        **extra,
    }
    # alias first: a process dying in between leaves a move without its record, which rollback refuses to guess
    # about, never a record of a move that did not happen
    client.set_registered_model_alias(name, alias, target.version)
    client.set_registered_model_tag(name, f"{HISTORY_PREFIX}{event_id}", json.dumps(event))
    _check_holder(cfg, client, target, f"after this {action} ({event_id}) was recorded; see `cxr models --history`")


def _check_holder(cfg: "Config", client: "MlflowClient", expected: "ModelVersion | None", when: str) -> None:
    """Raise if the alias is not on ``expected``: something outside the lock (the MLflow UI, a holder whose lock
    was broken as expired) moved it."""
    held = champion(cfg, client)
    if (held and str(held.version)) != (expected and str(expected.version)):
        raise RegistryError(
            f"{cfg.mlflow.registered_model}@{cfg.registry.alias} was moved to version "
            f"{held.version if held else None} by someone else {when}"
        )


def new_event_id(events: list[dict[str, Any]]) -> str:
    """A history ID that no other entry has and that sorts after every recorded one.

    The UTC time, nudged a microsecond past the last entry's when this machine's clock is behind, then a random
    tail: two writers racing outside the lock still write two tags, never one over the other.
    """
    now = dt.datetime.now(dt.UTC)
    last = next((e["id"] for e in reversed(events) if isinstance(e["id"], str)), None)
    if last is not None:
        now = max(now, _id_time(last) + dt.timedelta(microseconds=1))
    return f"{now.strftime(ID_TIME)}-{secrets.token_hex(3)}"


def _id_time(event_id: str) -> dt.datetime:
    return dt.datetime.strptime(event_id.split("-", 1)[0], ID_TIME).replace(tzinfo=dt.UTC)


def _history_order(event: dict[str, Any]) -> tuple[int, int, str]:
    """Entries numbered 1, 2, ... by older cxr first, in number order; then time-ordered IDs."""
    return (0, event["id"], "") if isinstance(event["id"], int) else (1, 0, str(event["id"]))


def history(cfg: "Config", client: "MlflowClient | None" = None) -> list[dict[str, Any]]:
    """Every alias move, oldest first."""
    from mlflow.exceptions import MlflowException

    client = client or _client(cfg)
    try:
        model = client.get_registered_model(cfg.mlflow.registered_model)
    except MlflowException:
        return []
    events = [json.loads(v) for k, v in model.tags.items() if k.startswith(HISTORY_PREFIX)]
    return sorted(events, key=_history_order)


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
                "evaluated": v.tags.get("evaluated", "?"),
                "val_auroc": _short(v.tags.get("val_auroc")),
                "val_auroc_ci": _interval(v.tags),
                **{k: _short(v.tags.get(k)) for k in ("test_auroc", "test_accuracy", "threshold")},
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
