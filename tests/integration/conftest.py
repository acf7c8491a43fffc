"""Shared by the integration tests that need the real service: `bentoml serve` on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`bentoml serve cxr.service:CxrService` in ``workdir`` (params.yaml and mlflow.db found there), on a
    free port of 127.0.0.1, in its own process group so that stopping it ends its workers too."""

    def __init__(self, workdir: Path, log: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        full_env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CXR_MODEL_URI")}
        full_env |= {"BENTOML_DO_NOT_TRACK": "true", "BENTOML_HOME": str(workdir / "bentoml_home"),
                     "CXR_PARAMS": str(workdir / "params.yaml"), **env}
        self._log = open(log, "w")
        bentoml = Path(sys.executable).with_name("bentoml")
        self.proc = subprocess.Popen(
            [str(bentoml), "serve", "cxr.service:CxrService", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=workdir, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"bentoml serve exited ({self.proc.returncode}):\n{self.text()[-3000:]}")
            try:
                if httpx.post(f"{self.url}/readyz", json={}, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        pytest.fail(f"bentoml serve not ready in {timeout} s:\n{self.text()[-3000:]}")

    def rss(self) -> int:
        """Resident memory of the whole server process tree, bytes."""
        import psutil

        root = psutil.Process(self.proc.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def start_service() -> Iterator[Callable[..., Server]]:
    """``start_service(workdir, log, **env)``: a ready Server; every one started is stopped at the module's end."""
    pytest.importorskip("cxr.service", reason="src/cxr/service.py is not there yet")
    started: list[Server] = []

    def start(workdir: Path, log: Path, **env: str) -> Server:
        server = Server(workdir, log, **env)
        started.append(server)
        server.wait_ready()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
