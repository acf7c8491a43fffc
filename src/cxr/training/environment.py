"""The environment a model is trained in, recorded in its card and its MLflow run: the lock the packages came
from (and whether they still match it), torch, the CPU's vector instructions, threads and the GPU.

Float results differ across CPU kinds and thread counts, so a figure without these cannot be reproduced.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import platform
import re
from pathlib import Path

import torch

from cxr.models.card import Environment

log = logging.getLogger(__name__)

LOCK = Path(__file__).resolve().parents[3] / "requirements.lock"  # the source tree's, for an editable install
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)


def environment(device: torch.device, lock: Path = LOCK) -> Environment:
    """What this process trains with; warns when installed packages differ from the lock."""
    lock_sha, drift = None, None
    if lock.is_file():
        text = lock.read_text()
        lock_sha, drift = hashlib.sha256(text.encode()).hexdigest(), lock_drift(text)
        if drift:
            log.warning(
                "installed packages differ from %s (%s): results may not match the lock's; `make venv` reinstalls it",
                lock.name,
                ", ".join(drift[:5]) + (f" and {len(drift) - 5} more" if len(drift) > 5 else ""),
            )
    return Environment(
        python=platform.python_version(),
        torch=torch.__version__,
        cpu=cpu_model(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        threads=torch.get_num_threads(),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        lock_sha256=lock_sha,
        lock_matches=None if drift is None else not drift,
    )


def lock_drift(lock_text: str) -> list[str]:
    """``name installed X, locked Y`` for every pinned package whose installed version differs (or is missing)."""
    out = []
    for name, pinned in _PIN.findall(lock_text):
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "missing"
        if installed != pinned:
            out.append(f"{name} {installed}, locked {pinned}")
    return out


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_tags(env: Environment) -> dict[str, str]:
    """The environment as MLflow run tags (``env.*``), for the run table."""
    return {f"env.{k}": str(v) for k, v in env.model_dump().items() if v is not None}
