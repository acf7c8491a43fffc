"""`dvc repro` runs the real pipeline; a second run with unchanged inputs is a no-op; metrics are readable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path, stdout_only: bool = False) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout if stdout_only else res.stdout + res.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("dvcproj")
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(REPO / "dvc.yaml", work)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["synthetic"].update(n_patients=40, size=96)
    params["prepare"].update(sizes=[32], workers=1)
    params["model"].update(image_size=32, width=8)
    params["train"].update(epochs=1, batch_size=16)
    params["evaluate"]["bootstrap"] = 50
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], work)
    (work / ".gitignore").write_text("/mlflow.db\n/mlartifacts/\n")
    run(["dvc", "init", "-q"], work)
    shutil.copy(REPO / ".dvc" / "config", work / ".dvc" / "config")  # the committed default remote
    return work


def test_repro_runs_all_stages_then_is_a_noop(project: Path):
    out = run(["dvc", "repro"], project)
    for stage in ("ingest", "prepare", "train", "evaluate"):
        assert f"Running stage '{stage}'" in out
    assert (project / "dvc.lock").exists()
    again = run(["dvc", "repro"], project)
    assert "Running stage" not in again and "up to date" in again
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project, stdout_only=True))[""]["data"]
    assert "auroc" in json.dumps(shown["reports/metrics.json"])
    # the champion's own evaluation is listed too: written by `cxr promote`, so absent (an error entry) until then
    assert "FileNotFoundError" in json.dumps(shown["reports/champion.json"])


def test_changing_a_param_reruns_only_downstream_stages(project: Path):
    run(["dvc", "repro"], project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lr"] = 0.001
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], project)
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    assert "Running stage 'ingest'" not in out and "Running stage 'prepare'" not in out


def test_dvc_exp_run_with_set_param(project: Path):
    run(["dvc", "repro"], project)
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.email=ci@example.org", "-c", "user.name=ci", "commit", "-qm", "baseline"], project)
    out = run(["dvc", "exp", "run", "-S", "model.arch=resnet18"], project)
    assert "Running stage 'train'" in out and "Running stage 'ingest'" not in out
    shown = run(["dvc", "exp", "show", "--json"], project)
    assert "resnet18" in shown and "auroc" in shown


def test_push_and_pull_through_the_default_local_remote(project: Path):
    run(["dvc", "repro"], project)
    run(["dvc", "push"], project)
    assert any((project / "dvc-storage").rglob("*")), "the default remote is not the project's dvc-storage/"
    manifest = (project / "data" / "raw" / "manifest.csv").read_text()
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    run(["dvc", "pull"], project)
    assert (project / "data" / "raw" / "manifest.csv").read_text() == manifest
