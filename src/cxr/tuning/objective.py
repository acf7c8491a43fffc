"""A trial: the one training function on the trial's parameters, pruned on the yardstick, logged as a child run."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr.errors import UserError
from cxr.training.callbacks import OptunaPruning, StopOnEvent, TrialPruned
from cxr.training.fit import fit
from cxr.training.scoring import Yardstick
from cxr.tuning.space import suggest
from cxr.tuning.storage import make_yardstick
from cxr.tuning.trial_runs import RUN_ID_ATTR, log_value, start_trial_run
from cxr.tuning.workers import PROCESS_ATTR, WORKER_ATTR, process_key

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient

    from cxr.config import Config

log = logging.getLogger(__name__)


class TrialFailed(Exception):
    """An unexpected error inside one trial: the trial fails, the study goes on."""


class QuotaReached(Exception):
    """Another worker finished the last trial asked for while this one was being created."""


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
        run_id = start_trial_run(client, experiment_id, parent_id, trial)
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
        except QuotaReached:
            close_trial_run(
                client, run_id, "FAIL", "KILLED", note="not run: the study already has the trials asked for"
            )
            trial.set_user_attr("quota_reached", True)
            raise
        except TrialPruned as pruned:
            trial.set_user_attr("epochs_trained", pruned.epoch)
            log_value(client, run_id, pruned.value, epochs_trained=pruned.epoch)  # fit logged no summary
            close_trial_run(client, run_id, "PRUNED", "KILLED")
            raise optuna.TrialPruned(str(pruned)) from None
        except UserError:
            close_trial_run(client, run_id, "FAIL", "FAILED")
            raise
        except (KeyboardInterrupt, SystemExit):
            close_trial_run(client, run_id, "FAIL", "KILLED", note="interrupted")
            raise
        except Exception as exc:
            close_trial_run(client, run_id, "FAIL", "FAILED", note=traceback.format_exc())
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
            log.warning("trial %d failed: %s: %s", trial.number, type(exc).__name__, exc)
            raise TrialFailed(str(exc)) from exc
        trial.set_user_attr("epochs_trained", result.epochs_trained)
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("val_auroc", result.best_val_auroc)
        log_value(client, run_id, result.objective)
        close_trial_run(client, run_id, "COMPLETE", "FINISHED")
        return result.objective

    return objective


def _record_worker(trial: "optuna.Trial") -> None:
    trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
    key = process_key(os.getpid())
    if key is not None:
        trial.set_user_attr(PROCESS_ATTR, key)


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
        raise QuotaReached()


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


def close_trial_run(
    client: "MlflowClient", run_id: str | None, state: str, status: str, note: str | None = None
) -> None:
    if run_id is None:
        return
    client.set_tag(run_id, "trial_state", state)
    if note:
        client.set_tag(run_id, "trial_note", note[-4000:])
    client.set_terminated(run_id, status)
