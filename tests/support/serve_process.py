"""`bentoml serve` as a child process on 127.0.0.1: what the integration tests and the benchmarks start.

The server runs in its own process group, so that stopping it ends BentoML's worker processes too
(they outlive a plain SIGTERM to the parent otherwise).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from support.processes import stop_group

# Taken from the caller's environment only when given explicitly: a stray one would serve another model.
_NOT_INHERITED = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "CXR_MODEL_URI",
    "CXR_BATCHING",
    "CXR_PARAMS",
    "CXR_PRECISION",
)


class ServiceNotReady(RuntimeError):
    """The server exited or did not answer /readyz in time; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """`bentoml serve cxr.serving.service:CxrService` run in ``workdir`` on a free loopback port.

    ``workdir/params.yaml`` (when present) is the service's config; ``env`` adds or overrides
    variables (``CXR_MODEL_URI``, ``CXR_BATCHING``, ``CXR_PARAMS`` ...). ``target`` may instead name
    a built bento (``cxr-service:<version>`` in the store under ``home``).
    """

    def __init__(
        self,
        workdir: Path,
        log: Path,
        *,
        home: Path | None = None,
        target: str = "cxr.serving.service:CxrService",
        **env: str,
    ) -> None:
        workdir = Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        full_env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
        full_env |= {"BENTOML_DO_NOT_TRACK": "true", "BENTOML_HOME": str(home or workdir / "bentoml_home")}
        if (workdir / "params.yaml").exists():
            full_env["CXR_PARAMS"] = str(workdir / "params.yaml")
        full_env |= env
        self._log = open(self.log, "w")
        bentoml = Path(sys.executable).with_name("bentoml")
        self.proc = subprocess.Popen(
            [str(bentoml), "serve", target, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=workdir,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180) -> "ServiceProcess":
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceNotReady(f"bentoml serve exited ({self.proc.returncode}):\n{self.text()[-3000:]}")
            try:
                if httpx.post(f"{self.url}/readyz", json={}, timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise ServiceNotReady(f"bentoml serve not ready in {timeout} s:\n{self.text()[-3000:]}")

    def rss(self) -> int:
        """Resident memory of the whole server process tree, bytes."""
        import psutil

        root = psutil.Process(self.proc.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])

    def stop(self) -> None:
        stop_group(self.proc)
        self._log.close()
