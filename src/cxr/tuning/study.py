"""`cxr tune`: an Optuna study whose objective is the one training function, ``fit(cfg.override(params), callbacks)``.

Seeded multivariate TPE, a median, percentile or hyperband pruner fed the trial's objective after every epoch
(by default AUROC on augmented copies of validation, see ``cxr.training.scoring.Yardstick``), RDB storage
(SQLite by default, PostgreSQL for many workers) with heartbeats so a killed worker's trial is marked failed,
and `--trials N` meaning N finished (complete or pruned) trials in the study. MLflow gets one parent run per
study and one child run per trial; we log them ourselves (optuna's MLflowCallback is deprecated and its
nested mode makes no parent run).

The study's parts: ``space``, ``storage``, ``objective`` (a trial), ``trial_runs`` (MLflow), ``workers``
(dead ones), ``interrupt`` (Ctrl-C); this module runs them and reports the result.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cxr.evaluation.evaluate import evaluate
from cxr.progress import progress_bar
from cxr.tracking import registry
from cxr.tracking import runs as tracking
from cxr.tuning.interrupt import remembered_interrupt
from cxr.tuning.objective import QuotaReached, TrialFailed, make_objective
from cxr.tuning.space import TuneError, check_space
from cxr.tuning.storage import best_trial, counts, load_study, make_storage
from cxr.tuning.trial_runs import RUN_ID_ATTR, log_summary, parent_run, sync_failed_runs
from cxr.tuning.workers import fail_stale_trials

if TYPE_CHECKING:
    import optuna

    from cxr.config import Config

log = logging.getLogger(__name__)


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
    result, best = tune_result(study, name, parent_id)
    if best is not None:
        result.best_params_file = write_best_params(cfg, best.params)
    if register:
        result.registered_version = register_best(cfg, result)
    log.debug("study summary: %s", json.dumps(summary, default=str))
    return result


def tune_result(study: Any, name: str, parent_id: str | None) -> tuple[TuneResult, Any]:
    """What the study holds now, and its best trial (None before any completes)."""
    n, best = counts(study), best_trial(study)
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
    return result, best


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
                catch=(TrialFailed, QuotaReached),
                gc_after_trial=True,
                callbacks=[lambda _study, trial, ran=ran: ran.append(trial)],
            )
            quota = ran and ran[0].user_attrs.get("quota_reached")
            failures = failures + 1 if ran and ran[0].state.name == "FAIL" and not quota else 0
            if failures >= cfg.tune.max_consecutive_failures:
                note = ran[0].user_attrs.get("error", "see the trial runs' `trial_note` tag in MLflow")
                raise TuneError(f"{failures} trials in a row failed; the last one: {note}")
            now, best = counts(study), best_trial(study)
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
