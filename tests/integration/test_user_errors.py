"""Every mistake a user can make at the command line ends in one line that says what to do, and exit 2."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import mlflow
import pytest

from cxr.tracking.runs import use_store
from support.cli import cxr_process
from support.serve_process import free_port


def cxr(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return cxr_process(workdir, *args, check=False, timeout=300)  # the program as a user runs it


def one_error_line(res: subprocess.CompletedProcess) -> str:
    """The refusal: exit 2, nothing on stdout, one `error:` line on stderr and no traceback."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr and not res.stdout.strip()
    return lines[0]


def test_a_wrong_data_path_names_the_path_and_what_it_should_hold(tmp_path: Path):
    line = one_error_line(cxr(tmp_path, "ingest", "-s", "data.source=kermany", "-s", "data.path=/no/such/folder"))
    assert "/no/such/folder does not exist" in line and "NORMAL" in line


def test_a_missing_params_file_is_named(tmp_path: Path):
    line = one_error_line(cxr(tmp_path, "train", "--params", "nope.yaml"))
    assert "nope.yaml does not exist" in line


def test_an_unknown_param_key_is_named_with_the_closest_known_key(tmp_path: Path):
    line = one_error_line(cxr(tmp_path, "config", "-s", "train.lrr=0.1"))
    assert "unknown config key 'train.lrr'" in line and "did you mean 'train.lr'" in line


def test_serving_before_anything_is_promoted_says_how_to_promote(tmp_path: Path):
    use_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.MlflowClient().create_registered_model("cxr")  # a registry with the model but no champion yet
    line = one_error_line(cxr(tmp_path, "serve", "--port", str(free_port())))
    assert "models:/cxr@champion" in line and "cxr promote VERSION" in line


def test_serving_on_a_port_in_use_says_to_pick_another(tmp_path: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_error_line(cxr(tmp_path, "serve", "--port", str(port)))
    assert f"port {port} on 127.0.0.1 is in use" in line and "--port" in line


@pytest.mark.parametrize("verbose", [False, True])
def test_verbose_brings_library_log_lines_back(tmp_path: Path, verbose: bool):
    """Quiet by default (no per-tile codec lines); -v shows libraries' INFO lines with logger names."""
    args = ["ingest", "-s", "data.synthetic.n_patients=4", "-s", "data.synthetic.jpeg2000_fraction=1.0"]
    res = cxr(tmp_path, *(["-v"] if verbose else []), *args)
    assert res.returncode == 0, res.stderr
    codec_lines = [line for line in res.stderr.splitlines() if "openjpeg" in line]
    assert bool(codec_lines) is verbose, res.stderr
    assert "ingested" in res.stderr
