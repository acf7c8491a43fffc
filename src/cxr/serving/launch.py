"""`cxr serve`: find out before `bentoml serve` starts what it would only report late or as a traceback
(no model to serve, a port already taken), then hand the process over to it."""

from __future__ import annotations

import errno
import socket
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
    return ["bentoml", "serve", SERVICE, "--host", host, "--port", str(port)]
