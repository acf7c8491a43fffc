"""Running `cxr` from a test: in this process (fast) or as the installed program in a subprocess (real).

In this process, a command skips the seconds a new interpreter spends importing torch and mlflow; use it to
build a project. A subprocess is the real program: use it where the test is about the process itself (its
exit code and output as a user sees them, being killed, running beside other workers).
Both return a ``CompletedProcess`` with ``returncode``, ``stdout`` and ``stderr``, and see the project's own
MLflow store (a tracking URI exported by the user or an earlier test is left out).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from unittest import mock

from typer.testing import CliRunner

from cxr.cli import app


def flags(overrides: Iterable[str]) -> list[str]:
    """``-s key=value`` for each override."""
    return [part for o in overrides for part in ("-s", o)]


def _failed(argv: tuple[str, ...], code: int, output: str) -> AssertionError:
    return AssertionError(f"cxr {' '.join(argv)} failed ({code}):\n{output}")


def cxr_here(
    workdir: Path, *argv: str, overrides: Iterable[str] = (), check: bool = True
) -> subprocess.CompletedProcess:
    """`cxr ARGV -s OVERRIDES` in this process, run from ``workdir``."""
    full = [*argv, *flags(overrides)]
    with contextlib.chdir(workdir), mock.patch.dict(os.environ):
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        res = CliRunner().invoke(app, full)
    if check and res.exit_code != 0:
        raise _failed(argv, res.exit_code, res.output) from res.exception
    return subprocess.CompletedProcess(full, res.exit_code, res.stdout, res.stderr)


def cxr_process(
    workdir: Path,
    *argv: str,
    overrides: Iterable[str] = (),
    check: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """`python -m cxr ARGV -s OVERRIDES` in a subprocess from ``workdir`` (``env`` added to this one's)."""
    full = [sys.executable, "-m", "cxr", *argv, *flags(overrides)]
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    res = subprocess.run(
        full, cwd=workdir, capture_output=True, text=True, timeout=timeout, env={**base, **(env or {})}
    )
    if check and res.returncode != 0:
        raise _failed(argv, res.returncode, f"{res.stdout}\n{res.stderr}")
    return res
