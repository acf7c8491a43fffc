"""`cxr tune`: an Optuna study whose objective is the one training function, ``fit(cfg.override(params), callbacks)``.

Seeded multivariate TPE, a median, percentile or hyperband pruner fed the trial's objective after every epoch
(by default AUROC on augmented copies of validation, see ``cxr.training.scoring.Yardstick``), RDB storage
(SQLite by default, PostgreSQL for many workers) with heartbeats so a killed worker's trial is marked failed,
and `--trials N` meaning N finished (complete or pruned) trials in the study. MLflow gets one parent run per
study and one child run per trial; we log them ourselves (optuna's MLflowCallback is deprecated and its
nested mode makes no parent run).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cxr.errors import UserError
from cxr.evaluation.evaluate import evaluate
from cxr.progress import progress_bar
from cxr.tracking import registry
from cxr.tracking import runs as tracking
from cxr.training.callbacks import OptunaPruning, StopOnEvent, TrialPruned
from cxr.training.fit import fit
from cxr.training.scoring import Yardstick

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient

    from cxr.config import Config, SpaceParam

log = logging.getLogger(__name__)
RUN_ID_ATTR = "mlflow_run_id"
WORKER_ATTR = "worker"  # host:pid of the process running the trial
PROCESS_ATTR = "worker_process"  # boot:pid-namespace:pid:start-time, to tell on this machine that it has ended
FAIL_REASON_ATTR = "fail_reason"  # why a trial whose worker died was failed (also its MLflow run's tag)
# The objective of a study that records none: studies made before objectives were recorded judged on this.
CLEAN_VALIDATION = {"objective": "val_auroc"}


class TuneError(UserError):
    """A study that cannot run as configured."""


class _TrialFailed(Exception):
    """An unexpected error inside one trial: the trial fails, the study goes on."""


class _QuotaReached(Exception):
    """Another worker finished the last trial asked for while this one was being created."""


@dataclass
class TuneResult:
    study: str
    n_complete: int
    n_pruned: int
    n_failed: int
    best_value: float | None
    best_params: dict[str, Any]
    best_run_id: str | None
    parent_run_id: str | None
    best_params_file: Path | None
    registered_version: str | None = None


# --- search space --------------------------------------------------------------------------------


def suggest(trial: "optuna.Trial", space: dict[str, "SpaceParam"]) -> dict[str, Any]:
    """Trial parameters as dotted config overrides."""
    params: dict[str, Any] = {}
    for key, p in space.items():
        if p.type == "categorical":
            params[key] = trial.suggest_categorical(key, p.choices)
        elif p.type == "int":
            params[key] = trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            params[key] = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)
    return params


def check_space(cfg: "Config") -> None:
    """Fail before any trial runs if a key or a choice would make an invalid config."""
    if not cfg.tune.space:
        raise TuneError("tune.space is empty: add dotted parameters to params.yaml (see README, '2. Tune')")
    for key, p in cfg.tune.space.items():
        for value in p.choices if p.type == "categorical" else [p.low, p.high]:
            if p.type == "int":
                value = int(value)
            try:
                cfg.override({key: value})
            except UserError as exc:
                raise TuneError(f"tune.space.{key}: value {value!r} is not a valid setting: {exc}") from None


# --- study ---------------------------------------------------------------------------------------


def make_pruner(cfg: "Config") -> "optuna.pruners.BasePruner":
    import optuna

    if cfg.tune.pruner in ("median", "percentile"):  # the median pruner is optuna's PercentilePruner(50)
        keep = 50.0 if cfg.tune.pruner == "median" else cfg.tune.keep_percentile
        startup = cfg.tune.startup_trials if cfg.tune.pruner_startup_trials is None else cfg.tune.pruner_startup_trials
        return optuna.pruners.PercentilePruner(keep, n_startup_trials=startup, n_warmup_steps=cfg.tune.warmup_epochs)
    if cfg.tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=max(1, cfg.tune.warmup_epochs), max_resource=cfg.train.epochs
        )
    return optuna.pruners.NopPruner()


def make_storage(cfg: "Config", url: str) -> "optuna.storages.RDBStorage":
    import optuna

    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://") :]
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=cfg.tune.heartbeat_interval, grace_period=cfg.tune.grace_period
            )
        except Exception as exc:  # unreachable server, bad URL, missing driver: say which storage
            # workers starting together race to create the schema: the loser finds it made on retry
            if attempt == 2 or "already exists" not in str(exc):
                raise TuneError(f"cannot open the Optuna storage {redact(url)}: {exc}") from None
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def redact(url: str) -> str:
    """A storage URL without its password, safe for logs and MLflow tags."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}@{host}"
    return url


def load_study(cfg: "Config", name: str, storage: "optuna.storages.RDBStorage", shared: bool) -> "optuna.Study":
    import optuna

    existing = _count_existing(storage, name)
    # Resuming reseeds past the trials already made, so a resumed study does not replay its first proposals;
    # workers sharing a server storage also mix in their pid so their random start-up trials differ.
    seed = cfg.tune.sampler_seed + existing + (os.getpid() if shared else 0)
    sampler = optuna.samplers.TPESampler(
        seed=seed, multivariate=True, n_startup_trials=cfg.tune.startup_trials, constant_liar=True
    )
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=sampler,
        pruner=make_pruner(cfg),
        direction=cfg.tune.direction,
        load_if_exists=True,
    )
    if study.direction.name.lower() != cfg.tune.direction:
        raise TuneError(f"study {name!r} exists with direction {study.direction.name.lower()}; use another --study")
    _same_objective(cfg, study, existing)
    return study


def make_yardstick(cfg: "Config") -> "Yardstick | None":
    """The configured augmentation, not a trial's own: every trial is measured on the same films."""

    if cfg.tune.objective != "augmented_val_auroc":
        if cfg.train.early_stopping.monitor == "augmented_val_auroc":
            raise UserError(
                "train.early_stopping.monitor=augmented_val_auroc picks each trial's epoch on the tuning "
                "yardstick, which the trial is then judged on: use it with tune.objective=augmented_val_auroc"
            )
        return None
    return Yardstick.from_config(cfg)


def objective_spec(cfg: "Config") -> dict[str, Any]:
    """What a trial's value means; trials are only comparable within one of these."""
    yardstick = make_yardstick(cfg)
    if yardstick is None:
        return dict(CLEAN_VALIDATION)
    return {
        "objective": cfg.tune.objective,
        "copies": yardstick.copies,
        "seed": yardstick.seed,
        "batch_size": yardstick.batch_size,
        "augment": yardstick.augment.model_dump(mode="json"),
    }


def _same_objective(cfg: "Config", study: "optuna.Study", existing: int) -> None:
    """Record the study's objective when it is made; refuse to add trials judged another way to it."""
    mine = objective_spec(cfg)
    recorded = study.user_attrs.get("objective")
    if recorded is None and not existing:
        study.set_user_attr("objective", mine)
        return
    recorded = recorded or CLEAN_VALIDATION
    if recorded != mine:
        raise TuneError(
            f"study {study.study_name!r} judges its trials on {json.dumps(recorded, sort_keys=True)}, this "
            f"run would judge on {json.dumps(mine, sort_keys=True)}; use another --study, or the study's "
            "settings (tune.objective, tune.objective_copies, train.augment, project.seed)"
        )


def _count_existing(storage: "optuna.storages.RDBStorage", name: str) -> int:
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return 0
    return len(storage.get_all_trials(study_id, deepcopy=False))


def counts(study: "optuna.Study") -> dict[str, int]:
    out = {s: 0 for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    out["finished"] = out["COMPLETE"] + out["PRUNED"]
    return out


def _best(study: "optuna.Study") -> "optuna.trial.FrozenTrial | None":
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:
        return None
    return (
        max(complete, key=lambda t: t.value)
        if study.direction.name == "MAXIMIZE"
        else min(complete, key=lambda t: t.value)
    )


# --- MLflow --------------------------------------------------------------------------------------


PARENT_SETTLE_S = 1.0  # a shared study's workers look again this long after making a parent run (see parent_run)


def parent_run(
    cfg: "Config", client: "MlflowClient", experiment_id: str, study: "optuna.Study", storage_url: str,
    shared: bool = False,
) -> str:  # fmt: skip
    """The study's one parent run, shared by resumed runs and by every worker of a distributed study.

    Workers starting together may each make one; all keep the oldest, and the others delete their own. A worker
    of a shared study looks again ``PARENT_SETTLE_S`` after making its run: looking at once, two workers each
    found only their own run (seen in the 3-worker PostgreSQL test), and the study had two parents."""
    filt = f"tags.`cxr.role` = 'study' and tags.`optuna.study` = '{study.study_name}'"
    key = redact(storage_url)

    def find() -> list:
        runs = client.search_runs([experiment_id], filt, max_results=100)
        runs = [r for r in runs if r.data.tags.get("optuna.storage") == key]
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    found = find()
    if found:
        return found[0].info.run_id
    mine = client.create_run(
        experiment_id,
        run_name=f"tune {study.study_name}",
        tags={"cxr.role": "study", "optuna.study": study.study_name, "optuna.storage": key, **tracking.git_state()},
    )
    if shared:
        time.sleep(PARENT_SETTLE_S)  # long enough for another worker's run made at the same moment to be visible
    found = find()
    if found[0].info.run_id != mine.info.run_id:  # another worker made one at the same moment: keep the oldest
        client.delete_run(mine.info.run_id)
    return found[0].info.run_id


def trial_run_tags(study_name: str, number: int, parent_id: str) -> dict[str, str]:
    """What makes an MLflow run a trial's: found by these tags when the trial never recorded its run id."""
    return {
        "mlflow.parentRunId": parent_id,
        "cxr.role": "trial",
        "optuna.study": study_name,
        "optuna.trial_number": str(number),
    }


def trial_run_name(number: int) -> str:
    return f"trial {number}"  # listed under its study's parent run, which names the study


def sync_failed_runs(client: "MlflowClient", study: "optuna.Study", experiment_id: str, parent_id: str) -> None:
    """Trials optuna marked failed (killed workers, Ctrl-C) get their MLflow run closed as failed: the run the
    trial recorded, else the one tagged with its number (killed before recording it), else a new one (killed
    before its run was made), so that every trial of the study is an MLflow run."""
    from optuna.trial import TrialState

    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    unrecorded = [t for t in failed if not t.user_attrs.get(RUN_ID_ATTR)]
    tagged = _trial_runs(client, experiment_id, parent_id) if unrecorded else {}
    parent_start = client.get_run(parent_id).info.start_time if unrecorded else 0
    for t in failed:
        run_id = t.user_attrs.get(RUN_ID_ATTR) or tagged.get(t.number)
        if run_id is None:
            if _millis(t.datetime_start) >= parent_start:  # older trials ran with MLflow off: they never had runs
                _record_lost_trial(client, experiment_id, parent_id, study.study_name, t)
            continue
        try:
            run = client.get_run(run_id)
        except Exception:  # run deleted by hand: nothing to close
            continue
        if run.info.status == "RUNNING" or run.data.tags.get("trial_state") in (None, "RUNNING"):
            client.set_tag(run_id, "trial_state", "FAIL")
            if t.user_attrs.get(FAIL_REASON_ATTR):
                client.set_tag(run_id, FAIL_REASON_ATTR, t.user_attrs[FAIL_REASON_ATTR])
            client.set_terminated(run_id, "FAILED")


def _trial_runs(client: "MlflowClient", experiment_id: str, parent_id: str) -> dict[int, str]:
    """The study's trial runs by trial number, read from their tags."""
    filt = f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`cxr.role` = 'trial'"
    found: dict[int, str] = {}
    token = None
    while True:
        page = client.search_runs([experiment_id], filt, max_results=1000, page_token=token)
        for r in page:
            found.setdefault(int(r.data.tags["optuna.trial_number"]), r.info.run_id)
        token = page.token
        if not token:
            return found


def _record_lost_trial(
    client: "MlflowClient", experiment_id: str, parent_id: str, study_name: str, t: "optuna.trial.FrozenTrial"
) -> None:
    """A failed run for a trial whose worker died between optuna making the trial and the trial making its run."""
    run = client.create_run(
        experiment_id,
        start_time=_millis(t.datetime_start),
        run_name=trial_run_name(t.number),
        tags={
            **trial_run_tags(study_name, t.number, parent_id),
            "trial_state": "FAIL",
            "trial_note": "the worker stopped before the trial's run was made",
            **({FAIL_REASON_ATTR: t.user_attrs[FAIL_REASON_ATTR]} if t.user_attrs.get(FAIL_REASON_ATTR) else {}),
        },
    )
    client.set_terminated(run.info.run_id, "FAILED", end_time=_millis(t.datetime_complete))


def _millis(when: Any) -> int:
    return int(when.timestamp() * 1000) if when is not None else int(time.time() * 1000)


def log_summary(cfg: "Config", client: "MlflowClient", parent_id: str, study: "optuna.Study") -> dict[str, Any]:
    """Best value and params, history and importance plots, and a CSV of all trials on the parent run."""
    import optuna

    n = counts(study)
    best = _best(study)
    summary: dict[str, Any] = {"study": study.study_name, **{f"n_{k.lower()}": v for k, v in n.items()}}
    objective = study.user_attrs.get("objective", CLEAN_VALIDATION)
    summary["objective"] = objective  # what best_value means
    client.set_tag(parent_id, "objective", objective["objective"])
    for k in ("COMPLETE", "PRUNED", "FAIL"):
        client.log_metric(parent_id, f"n_{k.lower()}", n[k])
    if best is not None:
        summary |= {
            "best_value": best.value,
            "best_trial": best.number,
            "best_params": best.params,
            "best_run_id": best.user_attrs.get(RUN_ID_ATTR),
        }
        client.log_metric(parent_id, "best_value", best.value)
        client.set_tag(parent_id, "best_trial", str(best.number))
        client.set_tag(parent_id, "best_run_id", str(best.user_attrs.get(RUN_ID_ATTR)))
        for k, v in best.params.items():
            client.set_tag(parent_id, f"best.{k}", str(v))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        study.trials_dataframe().to_csv(tmp / "trials.csv", index=False)
        figures = _plots(study, tmp)
        n_complete = n["COMPLETE"]
        if n_complete >= 2 and len(cfg.tune.space) > 1:
            try:
                summary["importances"] = optuna.importance.get_param_importances(study)
            except Exception as exc:  # e.g. every trial has the same params: importances undefined
                log.info("no parameter importances: %s", exc)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        for path in [tmp / "trials.csv", tmp / "summary.json", *figures]:
            client.log_artifact(parent_id, str(path), "study")
    return summary


def _plots(study: "optuna.Study", out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    from optuna.exceptions import ExperimentalWarning

    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        for name, fn in (
            ("optimization_history", ovm.plot_optimization_history),
            ("param_importances", ovm.plot_param_importances),
        ):
            try:
                ax = fn(study)
            except Exception as exc:  # too few complete trials for this plot
                log.info("no %s plot: %s", name, exc)
                continue
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            path = out / f"{name}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
    return paths


# --- the objective -------------------------------------------------------------------------------


def make_objective(
    cfg: "Config",
    client: "MlflowClient",
    experiment_id: str,
    parent_id: str | None,
    n_trials: int,
    interrupted: threading.Event | None = None,
):
    import optuna

    yardstick = make_yardstick(cfg)
    interrupted = interrupted or threading.Event()

    def objective(trial: optuna.Trial) -> float:
        # The trial's run comes first, before any work, so that a worker stopped at any later point leaves a run
        # to close (one stopped between optuna making the trial and this line is given a run by sync_failed_runs).
        _record_worker(trial)  # first: a resume on this machine can tell at once that this process died
        run_id = _start_trial_run(client, experiment_id, parent_id, trial)
        try:
            if run_id is not None:
                trial.set_user_attr(RUN_ID_ATTR, run_id)
            if interrupted.is_set():
                raise KeyboardInterrupt
            params = suggest(trial, cfg.tune.space)
            # A trial trains one network (n times cheaper than the configured ensemble) unless the space searches it.
            trial_cfg = cfg.override({"train.ensemble": 1, **params})
            _stand_down_if_study_full(trial, n_trials)
            result = _fit_trial(trial, trial_cfg, run_id, interrupted, yardstick, cfg.tune.log_models)
        except _QuotaReached:
            _close(client, run_id, "FAIL", "KILLED", note="not run: the study already has the trials asked for")
            trial.set_user_attr("quota_reached", True)
            raise
        except TrialPruned as pruned:
            trial.set_user_attr("epochs_trained", pruned.epoch)
            _log_value(client, run_id, pruned.value, epochs_trained=pruned.epoch)  # fit logged no summary
            _close(client, run_id, "PRUNED", "KILLED")
            raise optuna.TrialPruned(str(pruned)) from None
        except UserError:
            _close(client, run_id, "FAIL", "FAILED")
            raise
        except (KeyboardInterrupt, SystemExit):
            _close(client, run_id, "FAIL", "KILLED", note="interrupted")
            raise
        except Exception as exc:
            _close(client, run_id, "FAIL", "FAILED", note=traceback.format_exc())
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
            log.warning("trial %d failed: %s: %s", trial.number, type(exc).__name__, exc)
            raise _TrialFailed(str(exc)) from exc
        trial.set_user_attr("epochs_trained", result.epochs_trained)
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("val_auroc", result.best_val_auroc)
        _log_value(client, run_id, result.objective)
        _close(client, run_id, "COMPLETE", "FINISHED")
        return result.objective

    return objective


def _record_worker(trial: "optuna.Trial") -> None:
    trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
    key = process_key(os.getpid())
    if key is not None:
        trial.set_user_attr(PROCESS_ATTR, key)


def _log_value(client: "MlflowClient", run_id: str | None, value: float, epochs_trained: int | None = None) -> None:
    """The trial's value as metric ``objective`` on every finished trial, pruned ones too (optuna's value of a
    pruned trial is its last report), so the UI's compare view lines all trials up on one column."""
    if run_id is None:
        return
    client.log_metric(run_id, "objective", value)
    if epochs_trained is not None:
        client.log_metric(run_id, "epochs_trained", epochs_trained)


def _start_trial_run(
    client: "MlflowClient | None", experiment_id: str | None, parent_id: str | None, trial: "optuna.Trial"
) -> str | None:
    """The trial's child run under the study's parent run, tagged with its number (``None`` without MLflow)."""
    if client is None or parent_id is None:
        return None
    run = client.create_run(
        experiment_id,
        run_name=trial_run_name(trial.number),
        tags={**trial_run_tags(trial.study.study_name, trial.number, parent_id), "trial_state": "RUNNING"},
    )
    return run.info.run_id


def _stand_down_if_study_full(trial: "optuna.Trial", n_trials: int) -> None:
    """Two workers may start the last trial at once: the one with the higher number stands down."""
    from optuna.trial import TrialState

    others = [
        t
        for t in trial.study.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (t.state == TrialState.RUNNING and t.number < trial.number)
    ]
    if len(others) >= n_trials:
        raise _QuotaReached()


def _fit_trial(
    trial: "optuna.Trial",
    trial_cfg: "Config",
    run_id: str | None,
    interrupted: threading.Event,
    yardstick: "Yardstick | None",
    log_models: bool,
) -> Any:
    model_dir = Path(tempfile.mkdtemp(prefix=f"cxr-trial-{trial.number}-"))
    try:
        return fit(
            trial_cfg,
            [OptunaPruning(trial, tracked=run_id is not None), StopOnEvent(interrupted)],
            model_dir=model_dir / "model",
            run_id=run_id,
            log_model=log_models and run_id is not None,
            yardstick=yardstick,
            extra_tags={"optuna.trial_number": str(trial.number)},
        )
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)


def _close(client: "MlflowClient", run_id: str | None, state: str, status: str, note: str | None = None) -> None:
    if run_id is None:
        return
    client.set_tag(run_id, "trial_state", state)
    if note:
        client.set_tag(run_id, "trial_note", note[-4000:])
    client.set_terminated(run_id, status)


# --- the command ---------------------------------------------------------------------------------


def tune(
    cfg: "Config",
    n_trials: int,
    *,
    timeout: float | None = None,
    study_name: str | None = None,
    storage_url: str | None = None,
    register: bool = False,
) -> TuneResult:
    import optuna

    # optuna's own log repeats every trial with tracebacks; ours says what matters, once
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, fail_stale_trials
    if n_trials < 1:
        raise TuneError("--trials must be at least 1")
    check_space(cfg)
    name = study_name or cfg.tune.study
    url = storage_url or cfg.tune.storage
    storage = make_storage(cfg, url)
    shared = not url.startswith("sqlite")
    study = load_study(cfg, name, storage, shared)
    fail_stale_trials(study, storage)

    client = parent_id = experiment_id = None
    if cfg.mlflow.enabled:
        from mlflow import MlflowClient

        experiment_id = tracking.configure(cfg)
        client = MlflowClient()
        parent_id = parent_run(cfg, client, experiment_id, study, url, shared)
        sync_failed_runs(client, study, experiment_id, parent_id)
    with remembered_interrupt() as interrupted:
        objective = make_objective(cfg, client, experiment_id, parent_id, n_trials, interrupted)
        _optimize(cfg, study, storage, objective, name, n_trials, timeout, interrupted)

    fail_stale_trials(study, storage)
    summary = {}
    if client is not None:
        sync_failed_runs(client, study, experiment_id, parent_id)
        summary = log_summary(cfg, client, parent_id, study)
        client.set_terminated(parent_id, "FINISHED")
    n = counts(study)
    best = _best(study)
    result = TuneResult(
        study=name,
        n_complete=n["COMPLETE"],
        n_pruned=n["PRUNED"],
        n_failed=n["FAIL"],
        best_value=best.value if best else None,
        best_params=dict(best.params) if best else {},
        best_run_id=best.user_attrs.get(RUN_ID_ATTR) if best else None,
        parent_run_id=parent_id,
        best_params_file=None,
    )
    if best is not None:
        result.best_params_file = write_best_params(cfg, best.params)
    if register:
        result.registered_version = register_best(cfg, result)
    log.debug("study summary: %s", json.dumps(summary, default=str))
    return result


@contextlib.contextmanager
def remembered_interrupt():
    """Ctrl-C raises KeyboardInterrupt wherever the main thread is; raised inside a finaliser (a SQLAlchemy weakref
    callback, seen in CI) Python prints it and carries on. The event remembers it, so that the running trial stops
    at its next epoch and the study before its next trial anyway, and the unraisable-exception hook keeps that
    remembered interrupt from printing a traceback (any other unraisable exception is reported as before)."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return

    def on_sigint(signum: int, frame: Any) -> None:
        first = not interrupted.is_set()
        interrupted.set()
        # Inside a database call, an exception would leave its SQLite read open and the store locked for the
        # clean-up writes: the first Ctrl-C is then taken at the next epoch or trial boundary, a second at once.
        if first and _in_database_call(frame):
            return
        raise KeyboardInterrupt

    def on_unraisable(unraisable: Any) -> None:
        if not (interrupted.is_set() and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            previous_hook(unraisable)

    previous, previous_hook = signal.signal(signal.SIGINT, on_sigint), sys.unraisablehook
    sys.unraisablehook = on_unraisable
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook


def _in_database_call(frame: Any) -> bool:
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(("sqlalchemy", "sqlite3")):
            return True
        frame = frame.f_back
    return False


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


def process_gone(key: str) -> bool:
    """True only when ``key`` names a process of this machine's boot and this pid namespace that no longer runs;
    a process elsewhere (another host or container) is never judged here, its heartbeat is."""
    mine = process_key(os.getpid())
    try:
        boot, namespace, pid, _start = key.rsplit(":", 3)
        pid_number = int(pid)
    except ValueError:
        return False
    if mine is None or mine.split(":")[:2] != [boot, namespace]:
        return False
    return process_key(pid_number) != key


def _optimize(
    cfg: "Config",
    study: Any,
    storage: "optuna.storages.RDBStorage",
    objective: Any,
    name: str,
    n_trials: int,
    timeout: float | None,
    interrupted: threading.Event,
) -> None:
    """Run trials one at a time until the study has ``n_trials`` finished ones (other workers' count too)."""

    start, failures = time.monotonic(), 0
    done = counts(study)["finished"]
    log.info("study %s: %d of %d trials finished", name, done, n_trials)
    with progress_bar(f"study {name}", total=n_trials) as advance:
        advance(done)
        while done < n_trials:
            if interrupted.is_set():  # a Ctrl-C that a finaliser swallowed
                raise KeyboardInterrupt
            if timeout is not None and time.monotonic() - start >= timeout:
                log.info("timeout reached after %d trials", done)
                break
            fail_stale_trials(study, storage)
            now = counts(study)
            if now["finished"] + now["RUNNING"] >= n_trials:  # other workers are running the last trials
                time.sleep(2)
                advance(now["finished"] - done)
                done = now["finished"]
                continue
            ran: list = []
            study.optimize(
                objective,
                n_trials=1,
                catch=(_TrialFailed, _QuotaReached),
                gc_after_trial=True,
                callbacks=[lambda _study, trial, ran=ran: ran.append(trial)],
            )
            quota = ran and ran[0].user_attrs.get("quota_reached")
            failures = failures + 1 if ran and ran[0].state.name == "FAIL" and not quota else 0
            if failures >= cfg.tune.max_consecutive_failures:
                note = ran[0].user_attrs.get("error", "see the trial runs' `trial_note` tag in MLflow")
                raise TuneError(f"{failures} trials in a row failed; the last one: {note}")
            now, best = counts(study), _best(study)
            advance(now["finished"] - done, best=best.value if best else float("nan"), pruned=now["PRUNED"])
            done = now["finished"]


def write_best_params(cfg: "Config", params: dict[str, Any]) -> Path:
    """reports/best_params.yaml: dotted keys, usable with `-s` and `dvc exp run -S`."""
    path = Path(cfg.paths.reports) / "best_params.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(dict(params), sort_keys=True))
    tmp.replace(path)
    return path


def register_best(cfg: "Config", result: TuneResult) -> str:
    """Register the best trial's own model (already logged by its run), after evaluating it on test."""
    if result.best_run_id is None or not cfg.tune.log_models:
        raise TuneError("no best trial with a logged model to register (needs MLflow and tune.log_models=true)")
    best_cfg = cfg.override(
        {**result.best_params, "paths.reports": str(Path(cfg.paths.reports) / "tune" / result.study)}
    )
    evaluate(best_cfg, f"runs:/{result.best_run_id}/model")  # adds test_* metrics to the trial's run
    version = registry.register(best_cfg, run_id=result.best_run_id)
    return version.version
