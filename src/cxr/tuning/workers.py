"""Dead workers: a killed worker's running trial is failed at once, with the reason, so the study goes on."""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr.tuning.trial_runs import FAIL_REASON_ATTR

if TYPE_CHECKING:
    import optuna


log = logging.getLogger(__name__)


WORKER_ATTR = "worker"  # host:pid of the process running the trial


PROCESS_ATTR = "worker_process"  # boot:pid-namespace:pid:start-time, to tell on this machine that it has ended


def fail_stale_trials(study: Any, storage: "optuna.storages.RDBStorage") -> None:
    """Fail every RUNNING trial whose worker is known dead, with why as the trial's user attr ``fail_reason``.

    Dead means: its process, recorded on this machine, has ended (known at once, so a study resumed right after a
    kill -9 does not wait out the grace period); or its last heartbeat is older than the storage's grace period
    (Optuna's rule); or it never beat and started longer than the grace period ago, which Optuna never calls
    stale (optuna 5.0, ``RDBStorage._get_stale_trial_ids``), so that a resumed study would wait for it forever.
    """
    import optuna

    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if not running:
        return
    grace = storage.grace_period or 2 * (storage.heartbeat_interval or 0)
    now, beats = _heartbeats(storage, [t._trial_id for t in running])
    for trial in running:
        reason = _why_dead(trial, beats.get(trial._trial_id), now, grace)
        if reason is not None:
            _fail_dead_trial(storage, trial, reason)


def _why_dead(trial: Any, beat: dt.datetime | None, now: dt.datetime, grace: float) -> str | None:
    """Why ``trial``'s worker is known to be dead; None while it may be alive."""
    worker = f"worker {trial.user_attrs[WORKER_ATTR]}" if trial.user_attrs.get(WORKER_ATTR) else "its worker"
    since = f"no heartbeat since {beat:%Y-%m-%d %H:%M:%S} (database clock)" if beat else "no heartbeat yet"
    if trial.user_attrs.get(PROCESS_ATTR) and process_gone(trial.user_attrs[PROCESS_ATTR]):
        return f"{worker} died: its process has ended ({since})"
    if beat is not None and (now - beat).total_seconds() > grace:
        return f"{worker} died: {since}, longer than the {grace:g} s grace period"
    started = trial.datetime_start
    if beat is None and started and started < dt.datetime.now() - dt.timedelta(seconds=grace):
        return f"{worker} died before its first heartbeat (trial started {started:%Y-%m-%d %H:%M:%S})"
    return None


def _fail_dead_trial(storage: "optuna.storages.RDBStorage", trial: Any, reason: str) -> None:
    import optuna

    try:
        storage.set_trial_user_attr(trial._trial_id, FAIL_REASON_ATTR, reason)  # a finished trial takes none
        if storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL):
            log.warning("trial %d failed: %s", trial.number, reason)
    except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it first (or it just finished)
        pass


def _heartbeats(storage: "optuna.storages.RDBStorage", trial_ids: list[int]) -> tuple[dt.datetime, dict]:
    """The database's clock and the trials' last heartbeats by trial id (timezone dropped, as Optuna does)."""
    # private: Optuna offers no public query for it, and it is pinned (pyproject.toml)
    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(storage.scoped_session) as session:
        now = session.execute(sqlalchemy.func.now()).scalar().replace(tzinfo=None)
        rows = session.query(models.TrialHeartbeatModel).filter(models.TrialHeartbeatModel.trial_id.in_(trial_ids))
        return now, {r.trial_id: r.heartbeat.replace(tzinfo=None) for r in rows}


def process_key(pid: int) -> str | None:
    """``boot:pid-namespace:pid:start-time`` of a running process on this Linux machine; None where /proc cannot
    tell, or when no such process runs (a zombie has ended)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
        state, *fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        start = fields[18]  # field 22 of proc_pid_stat(5): start time after boot; a reused pid has another
    except (OSError, IndexError):
        return None
    return None if state == "Z" else f"{boot}:{namespace}:{pid}:{start}"


@functools.cache
def _own_key(pid: int) -> str | None:
    """This process's key, read from /proc once per process (the pid: a forked child is asked anew)."""
    return process_key(pid)


def process_gone(key: str) -> bool:
    """True only when ``key`` names a process of this machine's boot and this pid namespace that no longer runs;
    a process elsewhere (another host or container) is never judged here, its heartbeat is."""
    mine = _own_key(os.getpid())
    try:
        boot, namespace, pid, _start = key.rsplit(":", 3)
        pid_number = int(pid)
    except ValueError:
        return False
    if mine is None or mine.split(":")[:2] != [boot, namespace]:
        return False
    return process_key(pid_number) != key
