"""The environment a model is trained in: the lock it was installed from, and drift from it, named."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from pathlib import Path

import torch

from cxr.training.environment import environment, lock_drift

REPO = Path(__file__).resolve().parents[2]


def test_the_lock_pins_every_package_with_hashes():
    lines = (REPO / "requirements.lock").read_text().splitlines()
    pins = [line for line in lines if line and not line.startswith((" ", "#"))]
    assert len(pins) > 100 and all("==" in p and p.endswith("\\") for p in pins)  # each pin continues with hashes
    assert {"torch==2.14.1 \\", "mlflow==3.17.2 \\", "pydicom==3.0.2 \\"} <= set(pins)


def test_drift_from_the_lock_is_named(tmp_path, caplog):
    numpy = importlib.metadata.version("numpy")
    lock = tmp_path / "requirements.lock"
    lock.write_text(f"numpy=={numpy} \\\n    --hash=sha256:00\nscipy==0.0.1 \\\n    --hash=sha256:00\nnot-a-pkg==1.0\n")
    assert lock_drift(lock.read_text()) == [
        f"scipy {importlib.metadata.version('scipy')}, locked 0.0.1",
        "not-a-pkg missing, locked 1.0",
    ]
    with caplog.at_level(logging.WARNING):
        env = environment(torch.device("cpu"), lock)
    assert env.lock_matches is False and env.lock_sha256 == hashlib.sha256(lock.read_bytes()).hexdigest()
    assert "scipy" in caplog.text and "make venv" in caplog.text


def test_without_a_lock_the_environment_says_so(tmp_path):
    env = environment(torch.device("cpu"), tmp_path / "absent.lock")
    assert env.lock_sha256 is None and env.lock_matches is None
    assert env.torch == torch.__version__ and env.cpu_capability and env.gpu is None
