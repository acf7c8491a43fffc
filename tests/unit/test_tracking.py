"""Tracking configuration: each configure() call goes to its own config's store."""

from __future__ import annotations

import os

import mlflow

from cxr.config import Config
from cxr.tracking import runs as tracking


def _cfg(tmp_path, name):
    return Config().override(
        {
            "mlflow.tracking_uri": f"sqlite:///{tmp_path / name / 'mlflow.db'}",
            "mlflow.artifact_location": str(tmp_path / name / "artifacts"),
        }
    )


def test_second_configure_is_not_captured_by_the_first(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    tracking.configure(_cfg(tmp_path, "a"))
    # mlflow exports the URI to the environment; child processes must not inherit it as the user's choice
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    tracking.configure(_cfg(tmp_path, "b"))
    assert mlflow.get_tracking_uri().endswith("/b/mlflow.db") and mlflow.get_registry_uri().endswith("/b/mlflow.db")


def test_user_environment_wins_over_params(tmp_path, monkeypatch):
    (tmp_path / "env").mkdir()
    (tmp_path / "a").mkdir()
    env_uri = f"sqlite:///{tmp_path / 'env' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    tracking.configure(_cfg(tmp_path, "a"))
    assert mlflow.get_tracking_uri() == env_uri and os.environ["MLFLOW_TRACKING_URI"] == env_uri
