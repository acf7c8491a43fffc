"""MLflow bookkeeping: one parent run per study, one child run per trial, lost trials' runs closed as failed."""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr.tracking import runs as tracking
from cxr.tuning.storage import CLEAN_VALIDATION, best_trial, counts, redact

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient

    from cxr.config import Config

log = logging.getLogger(__name__)


RUN_ID_ATTR = "mlflow_run_id"


FAIL_REASON_ATTR = "fail_reason"  # why a trial whose worker died was failed (also its MLflow run's tag)


PARENT_SETTLE_S = 1.0  # a shared study's workers look again this long after making a parent run (see parent_run)


def parent_run(
    cfg: "Config",
    client: "MlflowClient",
    experiment_id: str,
    study: "optuna.Study",
    storage_url: str,
    shared: bool = False,
) -> str:
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
    tagged = trial_runs_by_number(client, experiment_id, parent_id) if unrecorded else {}
    parent_start = client.get_run(parent_id).info.start_time if unrecorded else 0
    for t in failed:
        run_id = t.user_attrs.get(RUN_ID_ATTR) or tagged.get(t.number)
        if run_id is None:
            if millis(t.datetime_start) >= parent_start:  # older trials ran with MLflow off: they never had runs
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


def trial_runs_by_number(client: "MlflowClient", experiment_id: str, parent_id: str) -> dict[int, str]:
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
        start_time=millis(t.datetime_start),
        run_name=trial_run_name(t.number),
        tags={
            **trial_run_tags(study_name, t.number, parent_id),
            "trial_state": "FAIL",
            "trial_note": "the worker stopped before the trial's run was made",
            **({FAIL_REASON_ATTR: t.user_attrs[FAIL_REASON_ATTR]} if t.user_attrs.get(FAIL_REASON_ATTR) else {}),
        },
    )
    client.set_terminated(run.info.run_id, "FAILED", end_time=millis(t.datetime_complete))


def millis(when: Any) -> int:
    return int(when.timestamp() * 1000) if when is not None else int(time.time() * 1000)


def log_summary(cfg: "Config", client: "MlflowClient", parent_id: str, study: "optuna.Study") -> dict[str, Any]:
    """Best value and params, history and importance plots, and a CSV of all trials on the parent run."""
    import optuna

    n = counts(study)
    best = best_trial(study)
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


def log_value(client: "MlflowClient", run_id: str | None, value: float, epochs_trained: int | None = None) -> None:
    """The trial's value as metric ``objective`` on every finished trial, pruned ones too (optuna's value of a
    pruned trial is its last report), so the UI's compare view lines all trials up on one column."""
    if run_id is None:
        return
    client.log_metric(run_id, "objective", value)
    if epochs_trained is not None:
        client.log_metric(run_id, "epochs_trained", epochs_trained)


def start_trial_run(
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
