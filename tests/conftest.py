"""Shared fixtures: the real data folder (skipped when absent) and tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("CXR_NO_PROGRESS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
_MLFLOW_ENV_AT_START = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """Each test's MLflow store stays its own: nothing a test did may redirect later subprocesses."""
    yield
    for key, value in _MLFLOW_ENV_AT_START.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA} (only in the team's checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def dicom_dir(shared_data: Path) -> Path:
    d = shared_data / "dicom"
    if not d.is_dir():
        pytest.skip(f"no real DICOMs at {d}")
    return d
