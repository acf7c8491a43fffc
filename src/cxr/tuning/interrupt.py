"""Ctrl-C during a study: remembered and raised where it is safe, never inside a database call."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


@contextlib.contextmanager
def remembered_interrupt():
    """Ctrl-C raises KeyboardInterrupt wherever the main thread is; raised inside a finaliser (a SQLAlchemy weakref
    callback, seen in CI) Python prints it and carries on. The event remembers it, so that the running trial stops
    at its next epoch and the study before its next trial anyway, and the unraisable-exception hook keeps that
    remembered interrupt from printing a traceback (any other unraisable exception is reported as before)."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return

    def on_sigint(signum: int, frame: Any) -> None:
        first = not interrupted.is_set()
        interrupted.set()
        # Inside a database call, an exception would leave its SQLite read open and the store locked for the
        # clean-up writes: the first Ctrl-C is then taken at the next epoch or trial boundary, a second at once.
        if first and _in_database_call(frame):
            return
        raise KeyboardInterrupt

    def on_unraisable(unraisable: Any) -> None:
        if not (interrupted.is_set() and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            previous_hook(unraisable)

    previous, previous_hook = signal.signal(signal.SIGINT, on_sigint), sys.unraisablehook
    sys.unraisablehook = on_unraisable
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook


def _in_database_call(frame: Any) -> bool:
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(("sqlalchemy", "sqlite3")):
            return True
        frame = frame.f_back
    return False
