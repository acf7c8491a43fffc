"""Shared by the benchmark scripts: where real data lives, machine facts, writing result JSON."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from cxr.config import REAL_FILMS_AUGMENT_STRENGTH
from cxr.training.environment import cpu_model

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CXR_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / "benchmarks" / "work"
sys.path.insert(0, str(REPO / "tests"))  # the test helpers (support/) that benchmarks share, e.g. serve_process


def require_shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        sys.exit(f"benchmark needs {path} (the team's real data folder); set CXR_SHARED_DATA")
    return path


def pneumoniamnist(size: int = 28) -> dict[str, Any]:
    """Config overrides: the shared PneumoniaMNIST .npz at ``size`` px (prepared and trained at that size)."""
    data = str(require_shared("pneumoniamnist", "pneumoniamnist.npz"))
    return {
        "data.source": "medmnist", "data.path": data, "prepare.sizes": [size], "model.image_size": size,
        "train.augment.strength": REAL_FILMS_AUGMENT_STRENGTH,  # real films' default (the synthetic one is 1.0)
    }  # fmt: skip


def work_paths(work: Path) -> dict[str, str]:
    """Config overrides: every path and the MLflow store of a run under ``work``."""
    return {
        **{f"paths.{name}": str(work / name) for name in ("raw", "prepared", "model", "reports")},
        "mlflow.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "mlflow.artifact_location": str(work / "mlartifacts"),
    }


def run_cxr(work: Path, command: str, overrides: dict[str, Any], env: dict[str, str] | None = None) -> None:
    """``cxr COMMAND -s key=value ...`` in ``work`` as DVC's stage would run it (MLflow off unless overridden)."""
    flags = [a for k, v in {"mlflow.enabled": "false", **overrides}.items() for a in ("-s", f"{k}={v}")]
    run = [sys.executable, "-m", "cxr", command, *flags]
    subprocess.run(run, cwd=work, env={**os.environ, **(env or {})}, check=True, stdout=subprocess.DEVNULL)


def machine() -> dict[str, Any]:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the vector kernels: they change float rounding
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for pkg in ("cxr", "mlflow", "optuna", "pydicom", "numpy"):
        info[pkg] = version(pkg)
    return info


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def code_dirty() -> bool | None:
    """True when the code a benchmark runs (src/, benchmarks/, params.yaml) differs from the recorded commit."""
    try:
        diff = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", "src", "benchmarks/*.py", "params.yaml"],
            cwd=REPO,
            capture_output=True,
        )
    except OSError:
        return None
    return {0: False, 1: True}.get(diff.returncode)


def write_result(name: str, figures: dict[str, Any], command: str | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    payload = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git_commit": git_commit(),
        "code_dirty": code_dirty(),  # then the figures come from uncommitted changes on top of git_commit
        "machine": machine(),
        "figures": figures,
    }
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(json.dumps(figures, indent=2, default=str))
    return out
