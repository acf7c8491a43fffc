"""One `cxr promote` / `cxr rollback` at a time per MLflow store: the lock held while the champion is read, the
decision made, the alias moved and the move recorded (cxr.tracking.registry).

A sqlite or file store gets a file lock beside it (flock: the kernel releases it if the process dies). A remote
registry (an MLflow server, a database URI) offers no lock, so a registered model named NAME_promotion_lock is
the mutex: creating a model is atomic (names are unique), and one left by a dead process is broken once expired.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from filelock import FileLock, Timeout

from cxr.errors import UserError

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

LOCK_WAIT_S = 120  # how long a promote/rollback waits for another one to finish before giving up
LOCK_MODEL_SUFFIX = "_promotion_lock"  # remote registries: NAME + this is a registered model while the lock is held
LOCK_EXPIRES_S = 120  # a lock left by a process that died is broken after this long (a move takes well under 1 s)


class LockBusy(UserError):
    """Another promote/rollback held the lock for longer than LOCK_WAIT_S."""


@contextlib.contextmanager
def promotion_lock(client: "MlflowClient", name: str) -> Iterator[None]:
    """Hold the store's promotion lock while reading, deciding, moving the alias and recording the move."""
    import mlflow

    uri = mlflow.get_registry_uri()
    if ":memory:" in uri:  # an in-memory database: no other process can see it
        yield
        return
    path = local_lock_path(uri)
    with _file_lock(path) if path is not None else _registry_mutex(client, name):
        yield


def local_lock_path(uri: str) -> Path | None:
    """The lock file beside a sqlite database or inside a file store; None for a remote registry."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :].split("?", 1)[0] + ".promotion.lock")
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else uri) / ".promotion.lock"
    return None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    lock = FileLock(path)  # flock: released by the kernel if the process dies, so it never goes stale
    try:
        lock.acquire(timeout=LOCK_WAIT_S)
    except Timeout:
        raise LockBusy(f"another promote/rollback has held {path} for over {LOCK_WAIT_S} s; try again") from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def _registry_mutex(client: "MlflowClient", name: str) -> Iterator[None]:
    """A lock for registries that offer none (an MLflow server, a database URI): the registered model
    NAME_promotion_lock exists while it is held. Creating a model is atomic (its name is unique in the store), so
    of racing creators exactly one succeeds. One left by a process that died is broken after LOCK_EXPIRES_S."""
    lock = f"{name}{LOCK_MODEL_SUFFIX}"
    token = f"{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    deadline = time.monotonic() + LOCK_WAIT_S
    while not _create_lock(client, lock, token):
        holder = _lock_holder(client, lock)
        if holder is not None and float(holder.get("expires", 0)) < time.time():
            log.warning("breaking %s, left by %s (expired)", lock, holder.get("token"))
            _delete_lock(client, lock, holder.get("token"))
        elif time.monotonic() > deadline:
            raise LockBusy(
                f"another promote/rollback ({(holder or {}).get('token')}) has held the registered model {lock!r} "
                f"for over {LOCK_WAIT_S} s; try again"
            )
        else:
            time.sleep(random.uniform(0.05, 0.3))  # rivals retry at different moments
    try:
        yield
    finally:
        _delete_lock(client, lock, token)


def _create_lock(client: "MlflowClient", lock: str, token: str) -> bool:
    from mlflow.exceptions import MlflowException

    tags = {"token": token, "expires": f"{time.time() + LOCK_EXPIRES_S:.3f}"}
    try:
        client.create_registered_model(lock, tags=tags, description="held by a running `cxr promote`/`cxr rollback`")
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):  # held (or just released)
            return False
        raise
    return True


def _lock_holder(client: "MlflowClient", lock: str) -> dict[str, str] | None:
    """The lock's tags (token, expires); None when nobody holds it."""
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_registered_model(lock).tags)
    except MlflowException:
        return None


def _delete_lock(client: "MlflowClient", lock: str, token: str | None) -> None:
    """Delete the lock if ``token`` still holds it (a holder that outlived its expiry may have lost it)."""
    from mlflow.exceptions import MlflowException

    holder = _lock_holder(client, lock)
    if holder is not None and holder.get("token") == token:
        with contextlib.suppress(MlflowException):  # another waiter broke it first
            client.delete_registered_model(lock)
