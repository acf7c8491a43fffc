"""Shared by the integration tests that need the real service: `bentoml serve` on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.serve_process import ServiceProcess as Server


@pytest.fixture(scope="module")
def start_service() -> Iterator[Callable[..., Server]]:
    """``start_service(workdir, log, **env)``: a ready Server; every one started is stopped at the module's end."""
    pytest.importorskip("cxr.serving.service", reason="src/cxr/serving/service.py is not there yet")
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
