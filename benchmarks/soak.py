"""Soak: a long, bounded load on a real `bentoml serve` on 127.0.0.1, watching for errors, stalls and memory growth.

    python benchmarks/soak.py [--requests 20000] [--concurrency 16]

Serves the default model shape (simple_cnn at 64 px with its out-of-distribution check, random weights: the
weights do not matter here) with adaptive batching on, then sends ``--requests`` /predict requests with
``--concurrency`` in flight: synthetic chest DICOMs and PNGs, and every 25th a file that is not an image (a
refusal, 422, is the expected answer to it). It records every status, each request's latency, and the resident
memory of the whole server process tree after every 1,000 requests.

The issue's targets: 0 errors (an unexpected status or a failed request), and the RSS at 20,000 requests within
10 % of the RSS at 5,000 (growth after warm-up means a leak). Latency is reported as ratios to the run's own p50
(the host is shared: absolute times say little). Writes benchmarks/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from common import REPO, write_result
from serving import make_model
from support.films import chest_dicom, png
from support.serve_process import ServiceProcess

NOT_AN_IMAGE = b"%PDF-1.4 not a radiograph\n" * 40
EVERY_NTH_REFUSED = 25
BLOCK = 1_000


def upload(i: int) -> tuple[bytes, int]:
    """Request ``i``'s file and the status it must get."""
    if i % EVERY_NTH_REFUSED == EVERY_NTH_REFUSED - 1:
        return NOT_AN_IMAGE, 422
    rng = np.random.default_rng(i % 64)
    if i % 2:
        return chest_dicom(i % 64, 96), 200
    return png((rng.random((80, 80)) * 200 + 30).astype(np.uint8)), 200


async def soak(server: ServiceProcess, requests: int, concurrency: int) -> dict:
    statuses: Counter[str] = Counter()
    latencies = np.zeros(requests)
    rss: dict[int, int] = {}
    done = 0
    files = [upload(i) for i in range(128)]  # built once: the load is on the server, not on this process
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            nonlocal done
            while not queue.empty():
                i = queue.get_nowait()
                data, expected = files[i % len(files)]
                t0 = time.perf_counter()
                try:
                    r = await client.post("/predict", files={"file": ("upload", data)})
                    statuses["ok" if r.status_code == expected else f"unexpected {r.status_code}"] += 1
                except httpx.HTTPError as exc:
                    statuses[f"failed {type(exc).__name__}"] += 1
                latencies[i] = time.perf_counter() - t0
                done += 1
                if done % BLOCK == 0:
                    rss[done] = server.rss()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return summary(statuses, latencies, rss, elapsed)


def summary(statuses: Counter[str], latencies: np.ndarray, rss: dict[int, int], elapsed: float) -> dict:
    p50 = float(np.percentile(latencies, 50))
    blocks = latencies.reshape(-1, BLOCK) if len(latencies) % BLOCK == 0 else latencies[None]
    mib = {n: round(v / 2**20, 1) for n, v in sorted(rss.items())}
    at = sorted(mib)
    base = 5_000 if 5_000 in mib else at[0]
    return {
        "requests": int(len(latencies)),
        "errors": sum(v for k, v in statuses.items() if k != "ok"),
        "statuses": dict(statuses),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(p50 * 1000, 1),
        "p99_to_p50": round(float(np.percentile(latencies, 99)) / p50, 2),
        "max_to_p50": round(float(latencies.max()) / p50, 2),
        "block_p50_to_first_block_p50": [round(float(np.median(b) / np.median(blocks[0])), 2) for b in blocks],
        "rss_mib_every_1000": mib,
        "rss_last_to_rss_at_5000": round(mib[at[-1]] / mib[base], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        model = make_model("simple_cnn", 64, home, ood=True)
        server = ServiceProcess(REPO, home / "serve.log", home=home, CXR_MODEL_URI=str(model), CXR_BATCHING="1")
        try:
            server.wait_ready()
            figures = asyncio.run(soak(server, args.requests, args.concurrency))
        finally:
            server.stop()
        log = (home / "serve.log").read_text(errors="replace")
        figures["tracebacks_in_server_log"] = log.count("Traceback")
    figures["targets"] = {
        "errors": "0",
        "rss_last_to_rss_at_5000": "<= 1.10",
        "met": figures["errors"] == 0 and figures["rss_last_to_rss_at_5000"] <= 1.10,
    }
    write_result("soak", {"model": "simple_cnn 64 px, OOD check, batching on", **figures})


if __name__ == "__main__":
    main()
