"""Moving the champion alias (promote, rollback) under the promotion lock, and the history of every move."""

from __future__ import annotations

import datetime as dt
import getpass
import json
import secrets
import socket
from typing import TYPE_CHECKING, Any

from cxr.tracking.promotion_lock import promotion_lock
from cxr.tracking.registry.errors import RegistryError
from cxr.tracking.registry.gate import Decision, decide
from cxr.tracking.registry.versions import champion, registry_client, version_entry

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from cxr.config import Config


HISTORY_PREFIX = "promotion."


ID_TIME = "%Y%m%dT%H%M%S.%fZ"  # a history entry's ID: this UTC time, then "-" and random hex


def promote(cfg: "Config", version: str | int, *, force: bool = False, reason: str | None = None) -> Decision:
    """Move the alias to ``version`` if it passes the gate; raises PromotionRefused otherwise.

    ``force`` with a ``reason`` overrides a refusal (not "already champion"); the history records both.
    """
    client = registry_client(cfg)
    name = cfg.mlflow.registered_model
    with promotion_lock(client, name):  # the champion judged against is the one the alias still holds when moved
        candidate = version_entry(client, name, version)
        current = champion(cfg, client)
        decision = decide(cfg, candidate, current, force, reason)
        overrode = decision.rule  # set only on a forced decision: the rule it overrides
        extra = {"forced": overrode is not None, "overrode": None if overrode is None else str(overrode)}
        _move_alias(cfg, client, current, candidate, "promote", decision.reason, **extra)
    return decision


def rollback(cfg: "Config", *, reason: str | None = None) -> "ModelVersion":
    """Return the alias to the version that held it before the promotion that put the current champion there."""
    client = registry_client(cfg)
    name, alias = cfg.mlflow.registered_model, cfg.registry.alias
    with promotion_lock(client, name):
        current = champion(cfg, client)
        if current is None:
            raise RegistryError(f"{name!r} has no {alias!r}: nothing to roll back")
        event = standing_promotion(history(cfg, client), alias, str(current.version))
        if event["from"] is None:
            raise RegistryError(f"version {current.version} was the first {alias}: no earlier holder")
        previous = version_entry(client, name, event["from"])
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

    client = client or registry_client(cfg)
    try:
        model = client.get_registered_model(cfg.mlflow.registered_model)
    except MlflowException:
        return []
    events = [json.loads(v) for k, v in model.tags.items() if k.startswith(HISTORY_PREFIX)]
    return sorted(events, key=_history_order)
