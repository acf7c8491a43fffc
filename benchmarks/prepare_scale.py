"""Does `cxr prepare`'s memory stay flat as the number of films grows?

    python benchmarks/prepare_scale.py                       # 5,000 and 50,000 synthetic films at 64 px
    python benchmarks/prepare_scale.py --films 2000,20000 --name prepare_scale_small

For each count: `cxr ingest` writes synthetic DICOMs (``data.synthetic.size``, default 64 px, so generation
stays cheap) under benchmarks/work/prepare_scale/, then `cxr prepare` runs under a small wrapper process
(this script with ``--measure``) that reports two memory figures for prepare and its pool workers:

- ``peak_tree_rss_mb``: the peak over time of the summed RSS of the prepare process and all its
  descendants, sampled with psutil every 50 ms (pages a forked worker shares with its parent count twice,
  so it overstates the tree's real footprint; a peak shorter than a sample can be missed);
- ``peak_maxrss_mb``: ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` in the wrapper, i.e. the exact peak RSS
  of the largest single process of the tree (the wrapper starts nothing else).

``figures.peak_rss_ratio`` is the largest count's peak_tree_rss_mb over the smallest's (target < 1.2).
images/s is films / wall seconds of the whole `cxr prepare` command (interpreter start and imports
included). Writes benchmarks/results/<name>.json (default prepare_scale).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from common import REPO, WORK, write_result

CXR = [sys.executable, "-m", "cxr"]
TARGET_RATIO = 1.2


def measure(cmd: list[str], interval: float = 0.05) -> dict[str, Any]:
    """Run cmd; sample its process tree's summed RSS; add the children's ru_maxrss."""
    start = time.perf_counter()
    proc = psutil.Popen(cmd)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        total = 0
        for p in tree:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        peak = max(peak, total)
        time.sleep(interval)
    wall = time.perf_counter() - start
    maxrss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: kilobytes
    return {"rc": proc.wait(), "wall_s": wall, "peak_tree_rss_mb": peak / 2**20, "peak_maxrss_mb": maxrss_kb / 1024}


def run_measured(cmd: list[str]) -> dict[str, Any]:
    """measure() in a fresh wrapper process, so RUSAGE_CHILDREN sees prepare's tree and nothing else."""
    out = subprocess.run([sys.executable, __file__, "--measure", "--", *cmd], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"measuring {' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def one_count(films: int, size: int, workers: int) -> dict[str, Any]:
    root = WORK / "prepare_scale" / f"n{films}"
    sets = [
        f"data.synthetic.n_patients={films}",
        "data.synthetic.images_per_patient_max=1",  # one film a patient: exactly `films` films
        f"data.synthetic.size={size}",
        f"paths.raw={root / 'raw'}",
        f"paths.prepared={root / 'prepared'}",
        f"prepare.sizes=[{size}]",
        f"prepare.workers={workers}",
    ]
    args = [a for s in sets for a in ("-s", s)]
    if not (root / "raw" / "source.json").exists() or _raw_count(root / "raw") != films:
        t0 = time.perf_counter()
        subprocess.run([*CXR, "ingest", *args], check=True, cwd=REPO)
        print(f"ingest {films}: {time.perf_counter() - t0:.0f} s", flush=True)
    load_before = os.getloadavg()[0]
    result = run_measured([*CXR, "prepare", *args])
    if result["rc"] != 0:
        sys.exit(f"cxr prepare failed for {films} films (exit {result['rc']})")
    card = json.loads((root / "prepared" / "card.json").read_text())
    return {
        "films": films,
        "n_images": card["n_images"],
        "n_rejected": card["n_rejected"],
        "array_mb": (films * size * size) / 2**20,
        "wall_s": round(result["wall_s"], 2),
        "images_per_s": round(films / result["wall_s"], 1),
        "peak_tree_rss_mb": round(result["peak_tree_rss_mb"], 1),
        "peak_maxrss_mb": round(result["peak_maxrss_mb"], 1),
        "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def _raw_count(raw: Path) -> int:
    return json.loads((raw / "source.json").read_text()).get("n_images", -1)


def main() -> None:
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(sys.argv[3:])))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--films", default="5000,50000", help="comma-separated film counts, smallest first")
    ap.add_argument("--size", type=int, default=64, help="synthetic film size and prepared array size (px)")
    ap.add_argument("--workers", type=int, default=2, help="prepare.workers (and ingest's)")
    ap.add_argument("--name", default="prepare_scale")
    a = ap.parse_args()
    runs = [one_count(int(n), a.size, a.workers) for n in a.films.split(",")]
    for r in runs:
        print(json.dumps(r), flush=True)
    small, large = runs[0], runs[-1]
    figures = {
        "summary": (
            f"peak RSS of prepare + workers {small['peak_tree_rss_mb']:.0f} MB at {small['films']} films, "
            f"{large['peak_tree_rss_mb']:.0f} MB at {large['films']} "
            f"(x{large['peak_tree_rss_mb'] / small['peak_tree_rss_mb']:.2f}, target < {TARGET_RATIO}); "
            f"{small['images_per_s']:.0f} / {large['images_per_s']:.0f} images/s at {a.size} px, {a.workers} workers"
        ),
        "runs": runs,
        "rss_measure": "peak over time of the summed RSS of `cxr prepare` and its pool workers (psutil, 50 ms)",
        "peak_rss_ratio": round(large["peak_tree_rss_mb"] / small["peak_tree_rss_mb"], 3),
        "peak_maxrss_ratio": round(large["peak_maxrss_mb"] / small["peak_maxrss_mb"], 3),
        "films_ratio": large["films"] / small["films"],
        "target_peak_rss_ratio": TARGET_RATIO,
    }
    write_result(a.name, figures)


if __name__ == "__main__":
    main()
