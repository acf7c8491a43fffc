"""A model worker that cannot load its model stops `bentoml serve` once, with exit status 3 and one line."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)


EXIT_CANNOT_START = 3  # the exit status of `bentoml serve` when the model cannot be loaded


def stop_server(message: str) -> None:
    """Without its model the service is useless, and BentoML's process manager would restart this
    worker forever, each time with a traceback: say why once, then stop `bentoml serve` (our parent),
    leaving it a mark so that it exits with EXIT_CANNOT_START rather than 0 (supervisors, Docker restart
    policies and scripts read the status; CxrService.exit_status_hook reads the mark)."""
    log.critical("the cxr service cannot start: %s", message)
    parent = psutil.Process().parent()
    if parent is not None and any("bentoml" in part for part in parent.cmdline()):
        try:
            _cannot_start_mark(parent).write_text(message)
        except OSError:  # no writable temp dir: stop anyway, with status 0
            pass
        parent.send_signal(signal.SIGTERM)
        os._exit(EXIT_CANNOT_START)


def _cannot_start_mark(process: Any) -> Path:
    """Named by pid and start time, so that a later process given the same pid never reads it."""
    return Path(tempfile.gettempdir()) / f"cxr-serve-cannot-start-{process.pid}-{int(process.create_time())}"


def _exit_cannot_start_if_marked() -> None:
    """Runs at exit in `bentoml serve` itself: after the graceful stop a worker's SIGTERM began
    (status 0), it turns the worker's mark into EXIT_CANNOT_START."""
    mark = _cannot_start_mark(psutil.Process())
    if mark.exists():
        mark.unlink(missing_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_CANNOT_START)  # sys.exit is ignored inside an atexit handler


def watch_for_cannot_start() -> None:
    """Make this process exit with EXIT_CANNOT_START when a worker marked it (idempotent)."""
    atexit.unregister(_exit_cannot_start_if_marked)
    atexit.register(_exit_cannot_start_if_marked)
