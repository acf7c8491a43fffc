"""Every tuning trial is an MLflow run: made before the trial does any work, and closed as failed on resume
whenever its worker died, wherever it died (before its run existed, before recording it, or mid-training)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from cxr.config import Config
from cxr.tracking import runs as tracking
from cxr.tuning import objective as trials
from cxr.tuning import trial_runs as mlflow_runs
from cxr.tuning import workers

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module (making its schema is the slow part): a config and the experiment."""
    folder = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as env:
        for key in tracking.URI_ENV:
            env.delenv(key, raising=False)
        cfg = Config().override(
            {
                "mlflow.tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
                "mlflow.artifact_location": str(folder / "artifacts"),
                "tune.objective": "val_auroc",
            }
        )
        yield cfg, tracking.configure(cfg)


@pytest.fixture
def tracked(store, tmp_path, request):
    """The config, an MLflow client, the experiment, a study of this test's own and its storage URL."""
    cfg, experiment_id = store
    tracking.configure(cfg)  # another test module may have pointed mlflow elsewhere
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name=request.node.name, storage=url, direction="maximize")
    return cfg, mlflow.MlflowClient(), experiment_id, study, url


def trial_runs(client, experiment_id: str, parent_id: str) -> dict[int, list]:
    found: dict[int, list] = {}
    for r in client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'"):
        found.setdefault(int(r.data.tags["optuna.trial_number"]), []).append(r)
    return found


def test_a_trial_run_exists_before_the_trial_does_any_work(tracked, monkeypatch):
    cfg, client, experiment_id, study, url = tracked
    parent_id = mlflow_runs.parent_run(cfg, client, experiment_id, study, url)
    seen = []

    def first_work(trial, space):  # choosing the trial's parameters is the first thing a trial does
        seen.extend(trial_runs(client, experiment_id, parent_id).get(trial.number, []))
        raise RuntimeError("worker stopped at its first piece of work")

    monkeypatch.setattr(trials, "suggest", first_work)  # as the objective calls it
    objective = trials.make_objective(cfg, client, experiment_id, parent_id, n_trials=1)
    study.optimize(objective, n_trials=1, catch=(trials.TrialFailed,))

    assert [r.data.tags["trial_state"] for r in seen] == ["RUNNING"]
    assert seen[0].data.tags["optuna.study"] == study.study_name
    (run,) = trial_runs(client, experiment_id, parent_id)[0]
    assert study.trials[0].user_attrs[mlflow_runs.RUN_ID_ATTR] == run.info.run_id
    assert run.info.status == "FAILED" and run.data.tags["trial_state"] == "FAIL"
    assert "worker stopped at its first piece of work" in run.data.tags["trial_note"]


def test_resume_closes_the_run_of_every_killed_trial(tracked):
    cfg, client, experiment_id, study, url = tracked
    before_mlflow = study.ask()  # a trial of a study tuned with MLflow off: it never had a run
    study.tell(before_mlflow, state=TrialState.FAIL)
    parent_id = mlflow_runs.parent_run(cfg, client, experiment_id, study, url)

    def start(record: bool) -> optuna.Trial:
        trial = study.ask()
        run_id = mlflow_runs.start_trial_run(client, experiment_id, parent_id, trial)
        if record:
            trial.set_user_attr(mlflow_runs.RUN_ID_ATTR, run_id)
        return trial

    mid_training = start(record=True)
    before_recording = start(record=False)
    before_its_run = study.ask()
    live = start(record=True)  # another worker's trial, still running
    for killed in (mid_training, before_recording, before_its_run):
        study._storage.set_trial_user_attr(killed._trial_id, mlflow_runs.FAIL_REASON_ATTR, f"died {killed.number}")
        study.tell(killed, state=TrialState.FAIL)  # what fail_stale_trials does when their workers are gone

    for _ in range(2):  # a second resume changes nothing
        mlflow_runs.sync_failed_runs(client, study, experiment_id, parent_id)
        found = trial_runs(client, experiment_id, parent_id)
        assert sorted(found) == [mid_training.number, before_recording.number, before_its_run.number, live.number]
        for t in (mid_training, before_recording, before_its_run):
            (run,) = found[t.number]
            assert run.info.status == "FAILED" and run.data.tags["trial_state"] == "FAIL"
            assert run.data.tags[mlflow_runs.FAIL_REASON_ATTR] == f"died {t.number}"  # why, beside the state
        assert "before the trial's run was made" in found[before_its_run.number][0].data.tags["trial_note"]
        (running,) = found[live.number]
        assert running.info.status == "RUNNING" and running.data.tags["trial_state"] == "RUNNING"
    assert before_mlflow.number not in found


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_failed_after_the_grace_period(tmp_path):
    """Optuna never calls a RUNNING trial without a heartbeat stale: a resume then waited for it forever."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=600)
    study = optuna.create_study(storage=storage, study_name="s")
    orphan = study.ask()  # RUNNING, and no heartbeat thread ever started: the worker died right there
    alive = study.ask()
    storage.record_heartbeat(alive._trial_id)  # a live worker's trial
    workers.fail_stale_trials(study, storage)  # within the grace period: a live worker may not have beaten yet
    assert {t.number: t.state for t in study.get_trials()} == {0: TrialState.RUNNING, 1: TrialState.RUNNING}
    time.sleep(1.5)  # both trials are now older than a 1-second grace period
    storage.grace_period = 1
    storage.record_heartbeat(alive._trial_id)  # the live worker has just beaten: Optuna's own check keeps it
    workers.fail_stale_trials(study, storage)
    assert study.get_trials()[orphan.number].state == TrialState.FAIL
    assert "died before its first heartbeat" in study.get_trials()[orphan.number].user_attrs["fail_reason"]
    assert study.get_trials()[alive.number].state == TrialState.RUNNING  # its heartbeat is the stale check's to judge
    time.sleep(2.1)  # and now it has not beaten for longer than the grace period (sqlite's clock counts whole seconds)
    workers.fail_stale_trials(study, storage)
    assert study.get_trials()[alive.number].state == TrialState.FAIL
    assert "no heartbeat since" in study.get_trials()[alive.number].user_attrs["fail_reason"]


@pytest.mark.skipif(workers.process_key(os.getpid()) is None, reason="needs Linux /proc to tell a process ended")
def test_a_trial_whose_worker_process_ended_is_failed_at_once_with_why(tmp_path):
    """kill -9 then resume on the same machine: no waiting out the grace period for the dead worker's trial."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=600)
    study = optuna.create_study(storage=storage, study_name="s")
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_key = workers.process_key(worker.pid)
    finally:
        worker.kill()  # kill -9
        worker.wait(timeout=30)
    killed, alive = study.ask(), study.ask()
    for trial, key in ((killed, dead_key), (alive, workers.process_key(os.getpid()))):
        trial.set_user_attr(workers.WORKER_ATTR, f"here:{key.split(':')[2]}")
        trial.set_user_attr(workers.PROCESS_ATTR, key)
        storage.record_heartbeat(trial._trial_id)  # both beat a moment ago: well within the grace period

    workers.fail_stale_trials(study, storage)
    trials = study.get_trials()
    assert trials[killed.number].state == TrialState.FAIL
    reason = trials[killed.number].user_attrs["fail_reason"]
    assert reason.startswith(f"worker here:{worker.pid} died: its process has ended (no heartbeat since "), reason
    assert trials[alive.number].state == TrialState.RUNNING and "fail_reason" not in trials[alive.number].user_attrs
    assert not workers.process_gone("otherboot:1:1:1") and not workers.process_gone("not a key")  # not ours to judge
