"""benchmarks/gpu.py without a GPU: one clear line, exit 0, and no result file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / "benchmarks" / "work" / "gpu"


def _snapshot() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in RESULTS.glob("*.json")}


def test_gpu_benchmark_without_cuda_says_so_and_writes_nothing():
    before, work_existed = _snapshot(), WORK.exists()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hide any GPU, so this holds on GPU machines too
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py")], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "no CUDA device: gpu.py measures nothing on CPU; run it on a GPU machine"
    assert _snapshot() == before, "gpu.py wrote or changed a result file without a GPU"
    assert WORK.exists() == work_existed, "gpu.py prepared data without a GPU"
