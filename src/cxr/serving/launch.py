"""`cxr serve`: find out before `bentoml serve` starts what it would only report late or as a traceback
(no model to serve, a port already taken), run it, and say "serving" only once the model answers."""

from __future__ import annotations

import errno
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cxr.errors import UserError
from cxr.models.predictor import ModelLoadError
from cxr.serving.served import WHAT_TO_DO, NoModelToServe, model_uri
from cxr.tracking.uris import ModelRef, resolve

if TYPE_CHECKING:
    from cxr.config import Config

SERVICE = "cxr.serving.service:CxrService"


class PortInUse(UserError):
    """Another process listens where the service would."""


def check_port(host: str, port: int) -> None:
    """Bind the way BentoML's arbiter will (address reuse on), so only a real listener counts as taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise UserError(f"cannot serve on {host}:{port}: {exc.strerror}") from None
            raise PortInUse(
                f"port {port} on {host} is in use (another `bentoml serve`?): stop that process or pick "
                "another port with --port"
            ) from None


def check_model(cfg: "Config", uri: str | Path | None) -> ModelRef:
    """The model that would be served: resolved now, so a missing champion is one line, not a dead worker."""
    try:
        ref, _ = resolve(cfg, str(uri or model_uri(cfg)))
    except ModelLoadError as exc:
        raise NoModelToServe(f"{exc}. {WHAT_TO_DO}.") from None
    return ref


def bentoml_argv(host: str, port: int) -> list[str]:
    """The BentoML of this Python, whether or not the venv is on PATH."""
    return [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port)]


def run_until_stopped(host: str, port: int, env: dict[str, str], on_ready: Callable[[dict], None]) -> int:
    """Run `bentoml serve`, call ``on_ready`` with /readyz's answer once the model answers, and return the
    server's exit status (3 when the model cannot be loaded: the worker said why in one line)."""
    server = subprocess.Popen(bentoml_argv(host, port), env=env)
    signal.signal(signal.SIGTERM, lambda *_: server.send_signal(signal.SIGTERM))  # a supervisor stops us: stop it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server too (same process group); it stops
    url = f"http://{_loopback(host)}:{port}/readyz"
    while server.poll() is None:
        ready = _ready(url)
        if ready is not None:
            on_ready(ready)
            break
        time.sleep(0.5)
    return server.wait()


def _loopback(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)


def _ready(url: str) -> dict | None:
    request = urllib.request.Request(url, data=b"{}", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    except (OSError, ValueError):  # not listening yet, 503 while the model loads, a half-started server
        return None
