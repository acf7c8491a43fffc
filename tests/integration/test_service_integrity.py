"""The real `bentoml serve` and `cxr serve` on a model that cannot be trusted: they stop at once with exit status 3
and one line, instead of restarting a worker forever or answering "normal" for every film."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from cxr.fsutil import sha256_file
from cxr.models.predictor import CARD_FILE, WEIGHTS_FILE
from cxr.serving.lifecycle import EXIT_CANNOT_START
from support.films import chest_dicom
from support.processes import stop_group
from support.serve_process import ServiceProcess, free_port
from support.tiny_model import tiny_model_dir

pytestmark = pytest.mark.slow

STOPS_WITHIN_S = 90  # start-up included (imports, two workers); a restart loop never stops at all


def rehash(path: Path) -> None:
    """The card made to agree with changed weights, so that the loader itself meets them."""
    card = json.loads((path / CARD_FILE).read_text())
    (path / CARD_FILE).write_text(json.dumps({**card, "weights_sha256": sha256_file(path / WEIGHTS_FILE)}))


def truncate(path: Path) -> None:
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    rehash(path)


def nan_weights(path: Path) -> None:
    state = load_file(str(path / WEIGHTS_FILE))
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(path / WEIGHTS_FILE))
    rehash(path)


def negate_head(path: Path) -> None:
    """Inverted answers, the card left as it was: only the recorded hash can tell."""
    state = load_file(str(path / WEIGHTS_FILE))
    key = [k for k, v in state.items() if v.is_floating_point()][-1]
    state[key] = -state[key]
    save_file(state, str(path / WEIGHTS_FILE))


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (truncate, "cannot load the weights"),
        (nan_weights, "NaN or inf on a probe image"),
        (negate_head, "not the file this model was saved with"),
    ],
    ids=["truncated", "nan", "changed"],
)
def test_bentoml_serve_stops_with_status_3_and_one_line(tmp_path: Path, damage, says: str):
    model = tiny_model_dir(tmp_path / "model")
    damage(model)
    srv = ServiceProcess(tmp_path, tmp_path / "serve.log", CXR_MODEL_URI=str(model))
    try:
        status = srv.proc.wait(timeout=STOPS_WITHIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the service kept running on a broken model:\n{srv.text()[-3000:]}")
    finally:
        srv.stop()
    log = srv.text()
    assert status == EXIT_CANNOT_START, log[-3000:]
    lines = [line for line in log.splitlines() if "cannot start" in line]
    assert len(lines) == 1 and says in lines[0], log[-3000:]
    assert "Traceback" not in log


def cxr_serve(workdir: Path, model: Path, port: int) -> subprocess.Popen:
    """`cxr serve` as a user runs it, without the venv on PATH (the program found by its full path)."""
    program = str(Path(sys.executable).with_name("cxr"))
    env = {"PATH": "/usr/bin:/bin", "BENTOML_DO_NOT_TRACK": "true", "BENTOML_HOME": str(workdir / "bentoml_home")}
    return subprocess.Popen(
        [program, "serve", "--model", str(model), "--port", str(port)],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_cxr_serve_exits_3_on_truncated_weights(tmp_path: Path):
    model = tiny_model_dir(tmp_path / "model")
    truncate(model)
    proc = cxr_serve(tmp_path, model, free_port())
    try:
        out, _ = proc.communicate(timeout=STOPS_WITHIN_S)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        pytest.fail("cxr serve kept running on truncated weights")
    assert proc.returncode == EXIT_CANNOT_START, out
    assert "Traceback" not in out and not any(line.startswith("serving") for line in out.splitlines()), out
    assert sum("cannot start" in line for line in out.splitlines()) == 1, out


def test_cxr_serve_says_serving_only_once_the_model_answers(tmp_path: Path):
    model = tiny_model_dir(tmp_path / "model")
    port = free_port()
    proc = cxr_serve(tmp_path, model, port)
    try:
        lines = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not any(line.startswith("serving") for line in lines):
            line = proc.stdout.readline()
            assert line, f"cxr serve ended: {''.join(lines)}"
            lines.append(line)
        assert any(line.startswith("serving model") for line in lines), "".join(lines)
        # once it says so, the model answers at once
        answer = httpx.post(f"http://127.0.0.1:{port}/predict", files={"file": chest_dicom(0, 64)}, timeout=30)
        assert answer.status_code == 200 and answer.json()["model"]["name"] == "model", answer.text
    finally:
        stop_group(proc)
