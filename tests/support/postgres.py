"""A throwaway PostgreSQL server on 127.0.0.1 for the distributed-tuning test and benchmark.

Uses the server binaries tests/system_packages.sh installs (Debian's /usr/lib/postgresql/<version>/bin).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support.serve_process import free_port


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder, or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    return found[-1] if found else None


def _as_postgres_user(root: Path) -> list[str]:
    """The server refuses to run as root: as root, run it as the `postgres` user and let it reach ``root``."""
    if os.geteuid() != 0:
        return []
    subprocess.run(["chown", "-R", "postgres", str(root)], check=True)
    root.chmod(0o755)
    for parent in root.parents:
        if parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | 0o011)
    return ["runuser", "-u", "postgres", "--"]


@contextmanager
def throwaway_postgres(root: Path, databases: tuple[str, ...] = ("optuna", "mlflow")) -> Iterator[str]:
    """Start a server with its data under ``root``, create ``databases``, yield ``postgresql://cxr@host:port``."""
    pg = pg_bin()
    if pg is None:
        raise FileNotFoundError("PostgreSQL is not installed (tests/system_packages.sh installs it as root)")
    data, sock = root / "data", root / "sock"
    sock.mkdir(parents=True)
    as_user = _as_postgres_user(root)
    port = free_port()
    quiet = {"check": True, "capture_output": True}
    subprocess.run([*as_user, str(pg / "initdb"), "-D", str(data), "-U", "cxr", "--auth=trust", "-E", "UTF8"], **quiet)
    options = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c max_connections=200"
    start = [str(pg / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "start"]
    subprocess.run([*as_user, *start, "-o", options], **quiet)
    try:
        for db in databases:
            subprocess.run(
                [*as_user, str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "cxr", db], **quiet
            )
        yield f"postgresql://cxr@127.0.0.1:{port}"
    finally:
        stop = [str(pg / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]
        subprocess.run([*as_user, *stop], capture_output=True)
