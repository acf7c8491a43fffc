"""Promote and rollback racing in two real processes on one sqlite MLflow store: every move that reported success
is in the history, the history is one unbroken chain in order, every rollback undid the promotion that had put the
champion there, and the alias is where the last entry says. Once, two racing commands both succeeded and one
entry overwrote the other (both numbered ``promotion.NNNN`` from the length of the history they had read).

The versions are made directly with MLflow (tags the gate passes), not trained: the race is about the registry.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest

from cxr.config import Config
from cxr.tracking import promotion_lock as locks
from cxr.tracking import registry
from cxr.tracking import runs as tracking

ROUNDS = 6  # commands per process per race
HEALTHY = {  # what the gate passes: evaluated on its own data, spread scores, an AUROC CI above chance
    "evaluated": "true",
    "dataset_hash": "d1",
    "eval_dataset_hash": "d1",
    "val_score_std": "0.3",
    "val_distinct_predictions": "2",
    "val_auroc": "0.9",
    "val_auroc_ci_low": "0.8",
    "val_auroc_ci_high": "0.95",
    "ood_method": "mahalanobis",
}
# race: (the lock to use, the seed promotions before it, each process's commands)
RACES = {
    "promote-promote": (
        "file",
        ["1"],
        [[("promote", v) for v in ["2", "3"] * (ROUNDS // 2)], [("promote", v) for v in ["4", "5"] * (ROUNDS // 2)]],
    ),
    "promote-rollback": (
        "file",
        ["1", "2", "3"],
        [[("promote", v) for v in ["4", "5"] * (ROUNDS // 2)], [("rollback", None)] * ROUNDS],
    ),
    "promote-rollback-mutex": (  # the lock a remote registry gets (a registered model), here with no lock file
        "mutex",
        ["1", "2", "3"],
        [[("promote", v) for v in ["4", "5"] * (ROUNDS // 2)], [("rollback", None)] * ROUNDS],
    ),
}


def config(db: Path, name: str) -> Config:
    return Config().override(
        {
            "mlflow.tracking_uri": f"sqlite:///{db}",
            "mlflow.artifact_location": str(db.parent / "artifacts"),
            "mlflow.registered_model": name,
        }
    )


def run_commands(cfg: Config, commands: list[tuple[str, str | None]]) -> list[dict[str, Any]]:
    """Each command through the library, as `cxr promote V --force` / `cxr rollback` run it, and how it ended."""
    done = []
    for action, version in commands:
        try:
            if action == "promote":
                registry.promote(cfg, version, force=True, reason="race")
                to = version
            else:
                to = str(registry.rollback(cfg).version)
            done.append({"action": action, "to": to, "ok": True})
        except registry.RegistryError as exc:  # refused, as a user would be told (nothing to roll back, ...)
            done.append({"action": action, "to": version, "ok": False, "error": str(exc)})
        except Exception as exc:  # a crash: the test fails on it
            done.append({"action": action, "to": version, "ok": False, "crash": f"{type(exc).__name__}: {exc}"})
    return done


def racer(db: Path, side: int, barrier: Any, results: Any) -> None:
    """A process of its own: every race's commands for its side, started together with the other side's."""
    os.chdir(db.parent)
    for name, (lock, _seed, sides) in RACES.items():
        if lock == "mutex":  # no lock file: the store is treated as a remote registry
            locks.local_lock_path = lambda uri: None
        barrier.wait(timeout=300)
        results.put((name, side, run_commands(config(db, name), sides[side])))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Iterator[Path]:
    """A sqlite MLflow store for the module, with no tracking URI in the environment (racers inherit it)."""
    db = tmp_path_factory.mktemp("race") / "mlflow.db"
    with pytest.MonkeyPatch.context() as env:
        for key in tracking.URI_ENV:
            env.delenv(key, raising=False)
        yield db


def model_with_versions(db: Path, name: str, n: int = 5) -> tuple[Config, mlflow.MlflowClient]:
    """Registered model ``name`` with ``n`` versions the gate passes, made directly (nothing trained)."""
    cfg = config(db, name)
    tracking.configure(cfg)
    client = mlflow.MlflowClient()
    client.create_registered_model(name)
    for _ in range(n):
        client.create_model_version(name, source=str(db.parent), tags=HEALTHY)
    return cfg, client


@pytest.fixture(scope="module")
def raced(store) -> dict[str, tuple[list[dict], list[dict], str]]:
    """Each race run once: its commands' outcomes, the history after it and the version the alias ends on."""
    for name, (_lock, seed, _sides) in RACES.items():
        cfg, _ = model_with_versions(store, name)
        for version in seed:
            registry.promote(cfg, version, force=True, reason="seed")
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no mlflow store inherited from this one
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=racer, args=(store, side, barrier, results)) for side in (0, 1)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=300) for _ in range(2 * len(RACES))]
    finally:
        for p in procs:
            p.join(timeout=60)
    outcomes = collections.defaultdict(list)
    for name, _side, done in got:
        outcomes[name] += done
    out = {}
    for name in RACES:
        cfg = config(store, name)
        tracking.configure(cfg)
        out[name] = (outcomes[name], registry.history(cfg), str(registry.champion(cfg).version))
    return out


@pytest.mark.parametrize("race", list(RACES))
def test_racing_commands_keep_every_move_in_order(raced, race):
    outcomes, events, alias = raced[race]
    seeded = len(RACES[race][1])
    assert not [o for o in outcomes if "crash" in o], outcomes
    succeeded = [o for o in outcomes if o["ok"]]
    assert succeeded, outcomes

    # every command that reported success has its own entry, and no entry is there that no command made
    moves = events[seeded:]
    assert collections.Counter((o["action"], o["to"]) for o in succeeded) == collections.Counter(
        (e["action"], e["to"]) for e in moves
    ), json.dumps(events, indent=1)
    assert len({e["id"] for e in events}) == len(events)

    # one chain: each move starts where the one before it left the alias, and the alias is where the last left it
    assert all(e["from"] == before["to"] for before, e in zip(events, events[1:])), json.dumps(events, indent=1)
    assert alias == events[-1]["to"]

    # each rollback undid the promotion that had put the champion there (the top of the stack of promotions)
    stack: list[dict] = []
    for e in events:
        if e["action"] == "promote":
            stack.append(e)
            continue
        top = stack.pop()
        assert e["undoes"] == top["id"] and (e["from"], e["to"]) == (top["to"], top["from"]), e


def legacy_entry(n: int, action: str, frm: str | None, to: str, **extra: Any) -> str:
    """A history entry as cxr wrote it before IDs were time-ordered: numbered from the history's length."""
    when = f"2026-01-0{n}T00:00:00+00:00"
    return json.dumps(
        {"id": n, "action": action, "alias": "champion", "from": frm, "to": to, "who": "x", "when": when, **extra}
    )


def test_entries_numbered_by_older_cxr_come_first_and_can_be_rolled_back(store):
    cfg, client = model_with_versions(store, "legacy", n=3)
    client.set_registered_model_tag("legacy", "promotion.0001", legacy_entry(1, "promote", None, "1"))
    client.set_registered_model_tag("legacy", "promotion.0002", legacy_entry(2, "promote", "1", "2"))
    client.set_registered_model_alias("legacy", "champion", "2")

    registry.promote(cfg, "3", force=True, reason="after an upgrade")
    assert [(e["id"], e["to"]) for e in registry.history(cfg)][:2] == [(1, "1"), (2, "2")]
    newest = registry.history(cfg)[2]
    assert isinstance(newest["id"], str) and newest["to"] == "3"

    assert str(registry.rollback(cfg).version) == "2"  # undoes the new-style entry ...
    assert str(registry.rollback(cfg).version) == "1"  # ... then the numbered one
    assert [e.get("undoes") for e in registry.history(cfg)[3:]] == [newest["id"], 2]
    with pytest.raises(registry.RegistryError, match="first"):
        registry.rollback(cfg)


def test_rollback_refuses_to_guess_when_the_alias_was_moved_outside_cxr(store):
    cfg, client = model_with_versions(store, "moved", n=3)
    for version in ("1", "2"):
        registry.promote(cfg, version, force=True, reason="setup")
    client.set_registered_model_alias("moved", "champion", "1")  # by hand, in the MLflow UI: no history entry
    with pytest.raises(registry.RegistryError, match="moved outside"):
        registry.rollback(cfg)
    assert str(registry.champion(cfg).version) == "1"  # left where it was


def test_a_new_id_sorts_after_the_last_even_when_this_clock_is_behind():
    ahead = "29991231T235959.999998Z-abcdef"  # written by a machine whose clock runs far ahead
    ids = [ahead]
    for _ in range(2):
        ids.append(registry.new_event_id([{"id": i} for i in ids]))
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert ids[1].startswith("29991231T235959.999999Z-")


def test_the_registry_lock_is_released_and_one_left_by_a_dead_process_is_broken(raced, store, monkeypatch):
    client = mlflow.MlflowClient()
    assert not [m.name for m in client.search_registered_models() if m.name.endswith(locks.LOCK_MODEL_SUFFIX)]

    cfg, client = model_with_versions(store, "stale-lock", n=1)
    lock = f"stale-lock{locks.LOCK_MODEL_SUFFIX}"
    client.create_registered_model(lock, tags={"token": "dead@host:1:x", "expires": "0"})  # its holder was killed
    monkeypatch.setattr(locks, "local_lock_path", lambda uri: None)
    registry.promote(cfg, "1")
    assert str(registry.champion(cfg).version) == "1"
    assert not [m for m in client.search_registered_models() if m.name == lock]
