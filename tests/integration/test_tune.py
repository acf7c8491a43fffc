"""`cxr tune` through the real CLI on tiny synthetic data: pruning, nested MLflow runs, kill and resume,
and three workers sharing one study on a real PostgreSQL server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
import yaml

from cxr.config import load_config
from cxr.data.loader import PreparedData
from cxr.tracking.runs import configure, use_store
from cxr.tracking.uris import load_predictor
from cxr.training.scoring import Yardstick
from support.cli import cxr_here, cxr_process, flags
from support.postgres import pg_bin, throwaway_postgres
from support.tiny import TINY_STUDY as TINY

pytestmark = pytest.mark.slow

# A space where one choice cannot learn (lr 1e-7), so the trials differ and the median pruner has something to
# prune (here: the lr 0.01 trial, whose augmented-validation AUROC starts below the frozen network's). All four
# trials are the sampler's seeded random start-up (lr 1e-7, 0.01, 1e-7, 1e-7 from sampler seed 0), so which
# choices are tried does not hang on float rounding (TPE, fed near-equal values, proposed 1e-7 four times on
# one CPU and not on another); the pruner acts from the second trial on.
SPACE = (
    "tune.space={train.lr: {type: categorical, choices: [0.01, 1.0e-7]}, "
    "model.dropout: {type: float, low: 0.0, high: 0.5}}"
)
TUNE = [*TINY, "train.epochs=4", "tune.startup_trials=4", "tune.pruner_startup_trials=1", "tune.warmup_epochs=0", SPACE]


def cxr(workdir: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return cxr_process(workdir, *argv, check=check)  # the real program: workers run beside it and get killed


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("tune")
    cxr_here(work, "ingest", overrides=TINY)
    cxr_here(work, "prepare", overrides=TINY)
    return work


def runs(work: Path, db: str = "mlflow.db"):
    use_store(f"sqlite:///{work / db}")
    return mlflow.search_runs(experiment_names=["cxr"], output_format="list")


def study_trials(url: str, name: str):
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def test_study_prunes_and_logs_every_trial_as_a_nested_run(prepared: Path):
    # train.ensemble=2 configured: a trial still trains one network (its metrics are val_auroc, not member<i>/...)
    res = cxr(prepared, "tune", "--trials", "4", "--study", "s4", *flags([*TUNE, "train.ensemble=2"]))
    assert "Traceback" not in res.stderr
    trials = study_trials(f"sqlite:///{prepared / 'optuna.db'}", "s4")
    states = [t.state.name for t in trials]
    assert len(trials) == 4 and set(states) <= {"COMPLETE", "PRUNED"}
    assert "PRUNED" in states and "COMPLETE" in states

    all_runs = runs(prepared)
    parents = [
        r for r in all_runs if r.data.tags.get("cxr.role") == "study" and r.data.tags.get("optuna.study") == "s4"
    ]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == [t.number for t in trials]
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    for t in trials:
        run = by_number[t.number]
        assert run.data.tags["trial_state"] == t.state.name
        assert run.info.status == ("FINISHED" if t.state.name == "COMPLETE" else "KILLED")
        assert float(run.data.params["train.lr"]) == t.params["train.lr"]
        # listed as "trial N" under "tune s4"; every trial, pruned too, carries its value (compare view columns)
        assert run.info.run_name == f"trial {t.number}" and parent.info.run_name == "tune s4"
        assert run.data.metrics["objective"] == pytest.approx(t.value)
        assert run.data.params.keys() == children[0].data.params.keys()
        epochs = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_auroc")
        assert len(epochs) == t.user_attrs["epochs_trained"] >= 1
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert all(t.user_attrs["epochs_trained"] < 4 for t in pruned)

    # the pruner was fed, and a trial is judged on, AUROC on augmented validation copies (train.augment as
    # configured, not the trial's own), logged beside the clean validation AUROC
    client = mlflow.MlflowClient()
    for t in trials:
        logged = [m.value for m in client.get_metric_history(by_number[t.number].info.run_id, "val_auroc_augmented")]
        assert list(t.intermediate_values.values()) == pytest.approx(logged)
    cfg = load_config(overrides=TINY)
    data = PreparedData(prepared / cfg.paths.prepared, 32)
    yardstick = Yardstick(cfg.train.augment, cfg.tune.objective_copies, cfg.project.seed)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    for t in complete:
        run = by_number[t.number]
        model = load_predictor(f"runs:/{run.info.run_id}/model").model
        rescored = yardstick.auroc(model, data, data.split("val"), torch.device("cpu"), "fp32")
        assert t.value == pytest.approx(rescored, abs=1e-6) == run.data.metrics["best_val_auroc_augmented"]
        assert t.user_attrs["val_auroc"] == pytest.approx(run.data.metrics["best_val_auroc"])
    assert any(abs(t.value - t.user_attrs["val_auroc"]) > 1e-3 for t in complete)

    # the parent holds the study summary
    best = max((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.tags["objective"] == "augmented_val_auroc"
    assert parent.data.metrics["n_pruned"] == len(pruned)
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "study")}
    assert {"study/trials.csv", "study/summary.json", "study/optimization_history.png"} <= arts

    # best params are dotted keys that the config accepts as overrides
    best_params = yaml.safe_load((prepared / "reports" / "best_params.yaml").read_text())
    assert best_params == best.params
    cfg = load_config(overrides=[*TINY, *(f"{k}={v}" for k, v in best_params.items())])
    assert cfg.train.lr == best.params["train.lr"]

    # asking again for the same number of trials runs nothing new
    cxr(prepared, "tune", "--trials", "4", "--study", "s4", *flags(TUNE))
    assert len(study_trials(f"sqlite:///{prepared / 'optuna.db'}", "s4")) == 4
    # trials judged another way would not be comparable with these: refused before any trial runs
    for other in ("tune.objective=val_auroc", "train.augment.strength=2.5"):
        res = cxr(prepared, "tune", "--trials", "5", "--study", "s4", *flags([*TUNE, other]), check=False)
        assert res.returncode == 2 and "judges its trials on" in res.stderr, res.stderr
    assert len(study_trials(f"sqlite:///{prepared / 'optuna.db'}", "s4")) == 4


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    """Poll until ``predicate()`` returns something truthy (returned); fail at once if ``proc`` has ended."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = predicate()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the command ended ({proc.returncode}) before {what}:\n{proc.communicate()[0]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _default_sigint() -> None:
    # A test run started in the background by a non-interactive shell inherits SIGINT ignored, and
    # Python then installs no Ctrl-C handler: give the child the terminal's default, as a user has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(work: Path, argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cxr", *argv],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=_default_sigint,
    )


@pytest.fixture
def cpu_hog():
    """A busy process beside the test (the load under which a kill once landed before the trial's run existed);
    it ends itself after a hard bound even if the test dies, and the test ends it by its pid."""
    hog = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.monotonic() + 600\nwhile time.monotonic() < end: pass"]
    )
    try:
        yield hog.pid
    finally:
        os.kill(hog.pid, signal.SIGKILL)
        hog.wait(timeout=30)


GRACE = 2  # seconds without a heartbeat before a killed worker's trial is marked failed


def test_interrupt_and_kill_then_resume_keep_finished_trials(prepared: Path, cpu_hog: int):
    url = f"sqlite:///{prepared / 'optuna.db'}"
    # the objective and model logging are covered above; here they would only slow each trial
    fast = ["tune.pruner=none", "tune.objective=val_auroc", "tune.log_models=false", "train.epochs=2"]
    argv = [
        "tune",
        "--trials",
        "2",
        "--study",
        "resume",
        *flags([*TINY, *fast, "tune.heartbeat_interval=1", f"tune.grace_period={GRACE}", SPACE]),
    ]

    storage = optuna.storages.RDBStorage(url)  # made here, so that polling never races the command to make it

    def state(name: str) -> list:
        try:
            study_id = storage.get_study_id_from_name("resume")
        except KeyError:  # study not created yet
            return []
        return [t for t in storage.get_all_trials(study_id, deepcopy=False) if t.state.name == name]

    def trial_runs() -> dict[int, list]:
        found: dict[int, list] = {}
        for r in runs(prepared):
            if r.data.tags.get("optuna.study") == "resume" and r.data.tags.get("cxr.role") == "trial":
                found.setdefault(int(r.data.tags["optuna.trial_number"]), []).append(r)
        return found

    # Ctrl-C once a trial is training (it has recorded its run): the trial and its run are marked failed at once
    # and the command exits 130
    proc = _start(prepared, argv)
    interrupted = _wait(
        lambda: [t.number for t in state("RUNNING") if t.user_attrs.get("mlflow_run_id")], 300, "a trial", proc
    )
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "resume" in out and "Traceback" not in out
    assert [t.number for t in state("FAIL")] == interrupted and not state("RUNNING")
    (run,) = trial_runs()[interrupted[0]]
    assert run.info.status == "KILLED" and run.data.tags["trial_state"] == "FAIL"

    # kill -9 after one finished trial, the moment the next trial is seen running (before or after its run is
    # made: either way it must end up an MLflow run): nothing is cleaned up by the dying worker
    proc = _start(prepared, argv)
    _wait(lambda: len(state("COMPLETE")) >= 1 and state("RUNNING"), 300, "a finished and a running trial", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    finished = {t.number: t.value for t in state("COMPLETE")}
    killed = [t.number for t in state("RUNNING")]
    assert len(killed) == 1
    # Past the grace period: the dead worker's last heartbeat is at least this old however loaded the machine.
    time.sleep(GRACE + 1)

    cxr(prepared, *argv)
    trials = study_trials(url, "resume")
    assert len([t for t in trials if t.state.name == "COMPLETE"]) == 2
    assert {t.number: t.value for t in trials if t.number in finished} == finished  # kept, not rerun
    dead = next(t for t in trials if t.number == killed[0])
    assert dead.state.name == "FAIL" and "died" in dead.user_attrs["fail_reason"], dead.user_attrs  # and why
    assert len({t.number for t in trials}) == len(trials)
    # every trial is one MLflow run in the trial's state; the killed trial's run is closed as failed
    found = trial_runs()
    assert {n: [r.data.tags["trial_state"] for r in rs] for n, rs in found.items()} == {
        t.number: [t.state.name] for t in trials
    }
    (killed_run,) = found[killed[0]]
    assert killed_run.info.status == "FAILED"
    assert killed_run.data.tags["fail_reason"] == dead.user_attrs["fail_reason"]


# --- PostgreSQL: three workers, one study ------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A throwaway PostgreSQL server on 127.0.0.1 (installed by tests/system_packages.sh, which `make test` runs)."""
    if pg_bin() is None:
        pytest.skip("PostgreSQL is not installed (tests/system_packages.sh installs it with apt-get as root)")
    with throwaway_postgres(tmp_path_factory.mktemp("pg")) as url:
        yield url


def test_three_workers_share_one_study_on_postgresql(prepared: Path, postgres: str):
    storage = f"{postgres}/optuna"
    tracking = f"postgresql+psycopg2://{postgres.split('://', 1)[1]}/mlflow"
    extra = [
        *TINY,
        "train.epochs=2",
        "tune.pruner=none",
        f"mlflow.tracking_uri={tracking}",
        f"mlflow.artifact_location={prepared / 'pg-artifacts'}",
        SPACE,
    ]
    configure(load_config(overrides=extra))  # the MLflow schema once, before the workers race to migrate it
    argv = ["tune", "--trials", "6", "--study", "dist", "--storage", storage, *flags(extra)]
    workers = [_start(prepared, argv) for _ in range(3)]
    outputs = []
    for w in workers:
        out, _ = w.communicate(timeout=600)
        outputs.append(out)
        assert w.returncode == 0, out

    trials = study_trials(f"postgresql+psycopg2://{storage.split('://', 1)[1]}", "dist")
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 6, [t.state.name for t in trials]
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    workers_seen = {t.user_attrs.get("worker") for t in trials}
    assert len(workers_seen) >= 2, (
        workers_seen,
        outputs,
    )  # the workers shared the study (a late one may find none left)
    use_store(tracking)
    all_runs = mlflow.search_runs(experiment_names=["cxr"], output_format="list")
    parents = [r for r in all_runs if r.data.tags.get("cxr.role") == "study"]
    assert len(parents) == 1
    children = {
        int(r.data.tags["optuna.trial_number"]): r
        for r in all_runs
        if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    }
    for t in trials:
        assert t.number in children and children[t.number].data.tags["trial_state"] == t.state.name
