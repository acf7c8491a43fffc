"""What the MLflow UI shows after a short study: `mlflow server` on the study's own store, read in headless
Chromium. The registered model page shows the ``champion`` alias on the promoted version; the experiment page
lists the study's parent run with its trials nested under it (shown once the parent is expanded), each with the
dataset it trained on. Without chromium the browser tests skip; the API-level test still runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import pytest

from cxr.config import load_config
from cxr.tracking.runs import use_store
from support.chromium import Chromium, find_chromium
from support.cli import cxr_here
from support.processes import stop_group
from support.serve_process import free_port
from support.tiny import TINY_STUDY as TINY

pytestmark = pytest.mark.slow

STUDY = "ui"
TUNE = [
    *TINY,
    "train.epochs=1",
    "tune.pruner=none",
    "tune.startup_trials=2",
    "tune.objective_copies=2",
    "tune.space={train.lr: {type: categorical, choices: [0.01, 0.001]}}",
]
TRIALS = ("trial 0", "trial 1")
RANDOM_NAME = re.compile(r"[a-z]+-[a-z]+-\d+")  # what MLflow calls a run it was given no name for


def cxr(workdir: Path, *argv: str, overrides: list[str] = TINY) -> None:
    cxr_here(workdir, *argv, overrides=overrides)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A 2-trial study under its parent run, the best trial registered and promoted to champion."""
    work = tmp_path_factory.mktemp("mlflow_ui")
    cxr(work, "ingest")
    cxr(work, "prepare")
    cxr(work, "tune", "--trials", "2", "--study", STUDY, "--register", overrides=TUNE)
    # a 1-epoch model is what the gate refuses (its rules are tested in test_registry.py): forced, on the record
    cxr(work, "promote", "1", "--force", "--reason", "UI test: a 1-epoch model", overrides=TINY)
    return work


class MlflowServer:
    """`mlflow server` on the project's sqlite store, in its own process group on a free loopback port."""

    def __init__(self, work: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = work / "mlflow-server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job-runner processes: the UI does not need them
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        argv = [str(mlflow_cli), "server", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                "--artifacts-destination", str(work / "mlartifacts"), "--host", "127.0.0.1",
                "--port", self.url.rsplit(":", 1)[1], "--workers", "1"]  # fmt: skip
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(argv, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mlflow server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"mlflow server not ready in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        stop_group(self.proc)


@pytest.fixture(scope="module")
def server(project: Path) -> Iterator[MlflowServer]:
    started = MlflowServer(project)
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Chromium]:
    executable = find_chromium()
    if executable is None:
        pytest.skip("chromium is not installed (tests/system_packages.sh installs it)")
    chromium = Chromium(executable, tmp_path / "profile")
    try:
        yield chromium
    finally:
        chromium.screenshot(tmp_path / "page.png")  # what the page showed last, for a failing run
        chromium.close()


def store(project: Path):
    cfg = load_config(overrides=TINY)
    use_store(f"sqlite:///{project / 'mlflow.db'}")
    return cfg, mlflow.MlflowClient()


def rows_js(needle: str) -> str:
    """JavaScript: the text of the table rows that contain ``needle``."""
    return f"[...document.querySelectorAll('tr, [role=row]')].map(r => r.innerText).filter(t => t.includes({needle!r}))"


def test_trials_share_params_metrics_and_datasets(project: Path):
    """Trials line up in the compare view: the same params and metric keys, and the same logged datasets."""
    _, client = store(project)
    runs = mlflow.search_runs(experiment_names=["cxr"], output_format="list")
    parent = next(r for r in runs if r.info.run_name == f"tune {STUDY}")
    trials = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                    key=lambda r: r.info.run_name)  # fmt: skip
    assert [t.info.run_name for t in trials] == list(TRIALS)
    assert trials[0].data.params.keys() == trials[1].data.params.keys()
    assert {"train.lr", "model.arch", "train.epochs"} <= trials[0].data.params.keys()
    assert {t.data.params["train.lr"] for t in trials} == {"0.01", "0.001"}
    # the registered trial alone was also evaluated on test (test_*, eval_val_*)
    trained = [{k for k in t.data.metrics if not k.startswith(("test_", "eval_"))} for t in trials]
    assert trained[0] == trained[1] >= {"objective", "val_auroc", "best_val_auroc", "epochs_trained"}
    for trial in trials:
        inputs = {context(i): i.dataset for i in trial.inputs.dataset_inputs}
        assert inputs.keys() == {"training", "validation", "testing"}
        assert {d.name for d in inputs.values()} == {"synthetic train", "synthetic val", "synthetic test"}
        assert len({d.digest for d in inputs.values()}) == 3
    assert not [r.info.run_name for r in runs if RANDOM_NAME.fullmatch(r.info.run_name)], "MLflow named a run"


def context(dataset_input) -> str | None:
    return next((t.value for t in dataset_input.tags if t.key == "mlflow.data.context"), None)


def test_registered_model_page_shows_the_champion_alias(project: Path, server: MlflowServer, browser: Chromium):
    cfg, client = store(project)
    name = cfg.mlflow.registered_model
    champion = client.get_model_version_by_alias(name, cfg.registry.alias)
    browser.open(f"{server.url}/#/models/{name}")
    rows = browser.wait_for(rows_js(f"Version {champion.version}"), f"the row of version {champion.version}")
    assert f"@ {cfg.registry.alias}" in " ".join(rows[0].split()), rows  # the UI writes "@\xa0champion"


def test_experiment_page_nests_the_trials_under_the_study_run(project: Path, server: MlflowServer, browser: Chromium):
    cfg, client = store(project)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    browser.open(f"{server.url}/#/experiments/{experiment.experiment_id}/runs")
    browser.wait_for(rows_js(f"tune {STUDY}") + ".length", f"the study's run 'tune {STUDY}'")
    shown = browser.text()
    assert not [t for t in TRIALS if t in shown], "trials listed on their own, not under the study's run"
    expander = (
        f"[...document.querySelectorAll('[role=row]')].find(r => r.innerText.includes('tune {STUDY}'))"
        ".querySelector('button[data-component-id*=runnamecellrenderer]')"
    )
    assert browser.evaluate(f"!!({expander})"), "the study's run has no expander: no runs are nested under it"
    browser.evaluate(f"{expander}.click()")
    for trial in TRIALS:
        browser.wait_for(rows_js(trial) + ".length", f"{trial} under the expanded study run")
    # each trial's Dataset cell: the training split it was fitted on (its lineage)
    browser.wait_for(rows_js("synthetic train") + ".length >= 2", "the trials' training dataset")
