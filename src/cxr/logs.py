"""Logging for the command line: cxr says what it does; libraries speak only when something is wrong.

Codecs log every JPEG 2000 tile, httpx every request and MLflow every run link at INFO: that is detail a user
reads only when debugging, so by default those loggers show warnings only. ``cxr -v`` (or ``CXR_VERBOSE=1``)
shows everything, with logger names. Lines go through the progress console, so they print above live bars.
"""

from __future__ import annotations

import logging
import os
import warnings

from cxr.progress import CONSOLE

VERBOSE_ENV = "CXR_VERBOSE"
# Loggers whose INFO lines are per file, per request or per run: silenced at their source unless verbose.
LIBRARY_LOGGERS = (
    "openjpeg",
    "pylibjpeg",
    "libjpeg",
    "rle",
    "httpx",
    "httpcore",
    "mlflow",
    "alembic",
    "urllib3",
    "optuna",
    "bentoml",
    "PIL",
    "matplotlib",
)
# Warnings raised inside libraries about their own internals, which a cxr user cannot act on.
LIBRARY_WARNINGS = (
    ("ignore", r".*", UserWarning, r"mlflow(\..*)?"),
    ("ignore", r".*", FutureWarning, r"mlflow(\..*)?"),
)


class _ConsoleHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            CONSOLE.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:  # logging must never take the program down
            self.handleError(record)


class _Plain(logging.Formatter):
    """cxr's own INFO lines as bare sentences; warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


def verbose_from_env() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def setup(verbose: bool = False) -> None:
    """Configure the root logger once per command (idempotent)."""
    verbose = verbose or verbose_from_env()
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s") if verbose else _Plain())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("cxr").setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is first imported
        for action, message, category, module in LIBRARY_WARNINGS:
            warnings.filterwarnings(action, message=message, category=category, module=module)
    logging.captureWarnings(True)
