"""`make demo`: the whole mission on the built-in synthetic data, with the commands a team types.

dvc repro → a short `cxr tune` (its own study, pruning on) that registers its best trial → `cxr promote`
through the gate → a synthetic second hospital → `cxr serve` in the background on 127.0.0.1 →
`cxr evaluate-external --calibrate` through the HTTP API (first, how many of the site's films the model calls out
of distribution; a site threshold is chosen on 30% of the films it does decide, when there are enough) → the server
stopped → a summary and the next commands. With the defaults, the model finds every hospital_b film unlike its
training films (another scanner's blur, response curve and collimation), so the service abstains on them and no site
threshold is chosen: the summary says so, beside the metrics on all films.
Run again, it reuses what is done: DVC's cache, the finished study, the registered version, the site's files.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from rich.console import Console

from cxr.cli import external_table, site_table, tables
from cxr.config import load_config
from cxr.evaluation.champion import write_champion_summary
from cxr.tracking import registry

STUDY = "demo"
SITE, SITE_DIR, SITE_PATIENTS = "hospital_b", Path("data/external/hospital_b"), 200
EXTERNAL_OUT = Path("reports/external")
CALIBRATE = "0.3"  # share of the site's films that choose its own threshold; both thresholds are scored on the rest
SERVE_LOG = Path("reports/demo/serve.log")
METRICS = "reports/metrics.json"  # dvc repro's model, which the tuned champion need not be
READY_TIMEOUT_S = 300
# A study small enough for two CPU cores: three trials of the default length (the synthetic findings take
# 8-20 epochs to learn), pruned from the second trial on, around the default learning rate and augmentation.
TUNE = [
    "--trials", "3", "--study", STUDY, "--register",
    "-s", "tune.startup_trials=1",
    "-s", "tune.pruner_startup_trials=1",
    "-s", "tune.warmup_epochs=10",
    "-s", "tune.space={train.lr: {type: float, low: 0.002, high: 0.008, log: true}, "
    "model.dropout: {type: float, low: 0.0, high: 0.5}, train.augment.strength: {type: float, low: 0.5, high: 2.5}}",
]  # fmt: skip
console = Console(soft_wrap=True)  # a long command stays one line in a log
timings: dict[str, float] = {}  # step name -> seconds, shown in the summary


def step(number: int, name: str, title: str) -> None:
    now = time.monotonic()
    if timings:
        last = next(reversed(timings))
        timings[last] = now - timings[last]
    timings[name] = now
    console.rule(f"[bold]{number}/6  {title}", align="left")


def run(*argv: str) -> None:
    console.print(f"[cyan]$ {shlex.join(argv)}", highlight=False)
    if subprocess.run(argv).returncode != 0:
        console.print(f"[red]demo stopped: `{shlex.join(argv)}` failed (its message is above)")
        sys.exit(1)


def promote_newest() -> str:
    """The version `cxr tune --register` made, promoted through the gate unless it already is the champion."""
    cfg = load_config()
    newest = registry.versions(cfg)[0]
    if cfg.registry.alias in newest["aliases"]:
        console.print(f"version {newest['version']} already is the {cfg.registry.alias}")
        write_champion_summary(cfg)  # as `cxr promote` would have: reports/ may have been cleaned since
    else:
        run("cxr", "promote", newest["version"])
    return newest["version"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    """`cxr serve` in its own process group, its log in a file; returns once /readyz answers 200."""
    argv = ["cxr", "serve", "--port", str(port)]
    console.print(f"[cyan]$ {shlex.join(argv)} &[/]   (log: {SERVE_LOG})", highlight=False)
    SERVE_LOG.parent.mkdir(parents=True, exist_ok=True)
    with SERVE_LOG.open("w") as log:
        server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    console.print(f"the service answers on http://127.0.0.1:{port} (pid {server.pid})")
                    return server
        except OSError:
            time.sleep(1)
    stop_server(server)
    console.print(f"[red]demo stopped: the service did not become ready; the end of {SERVE_LOG}:")
    console.print(SERVE_LOG.read_text()[-2000:], markup=False, highlight=False)
    sys.exit(1)


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    console.print(f"stopped the service (pid {server.pid})")


def summary(version: str) -> None:
    report = json.loads((EXTERNAL_OUT / "report" / "external.json").read_text())
    steps = list(timings.items())[:-1]  # the last one is the summary itself
    console.print("seconds per step: " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in steps))
    console.print(f"champion: {load_config().mlflow.registered_model} version {version}")
    console.print(f"out of distribution at {SITE}: {report['out_of_distribution']['verdict']}", highlight=False)
    tables().print(external_table(report))
    if "site_calibration" in report:
        tables().print(site_table(report["site_calibration"]))
    else:
        console.print(f"no site threshold: {report['site_calibration_skipped']}", highlight=False)
    console.print(f"external report: {EXTERNAL_OUT / 'report' / 'external.html'}")
    for label, path in (("champion", "reports/champion.json"), ("pipeline model (dvc repro, models/cxr)", METRICS)):
        test = json.loads(Path(path).read_text()).get("test", {})
        console.print(f"{label}: test AUROC {test.get('auroc', float('nan')):.3f} in {path}", highlight=False)
    console.print("`dvc metrics show` lists both; the champion is the one served")
    console.print(
        "\n[bold]Next:[/]\n"
        f"  mlflow ui --backend-store-uri {load_config().mlflow.tracking_uri}   # runs, the study, the registry\n"
        "  cxr serve                      # or `bentoml serve`: the champion on http://127.0.0.1:3000\n"
        "  cxr tune --trials 50           # the full search (tune.space in params.yaml)\n"
        f"  cxr evaluate-external --url http://127.0.0.1:3000 --data {SITE_DIR}",
        highlight=False,
    )


def main() -> None:
    started = time.monotonic()
    step(1, "dvc repro", "Build a model: ingest → prepare → train → evaluate")
    run("dvc", "repro")
    step(2, "tune", f"Tune: study {STUDY!r}, every trial an MLflow run; the best one registered")
    run("cxr", "tune", *TUNE)
    step(3, "promote", "Promote the registered version to champion through the gate")
    version = promote_newest()
    step(4, "second site", f"A second hospital: synthetic films from another site ({SITE})")
    if (SITE_DIR / "site.json").exists():
        console.print(f"{SITE_DIR} is there from an earlier run")
    else:
        run("cxr", "synthesize-site", "--site", SITE, "--out", str(SITE_DIR), "--patients", str(SITE_PATIENTS))
    step(5, "serve + evaluate-external", "Serve the champion and score the second hospital through its HTTP API")
    port = free_port()
    server = start_server(port)
    try:
        url = f"http://127.0.0.1:{port}"
        run(
            "cxr",
            "evaluate-external",
            "--url",
            url,
            "--data",
            str(SITE_DIR / "manifest.csv"),
            "--out",
            str(EXTERNAL_OUT),
            "--calibrate",
            CALIBRATE,
        )
    finally:
        stop_server(server)
    step(6, "summary", f"Summary ({time.monotonic() - started:.0f} s)")
    summary(version)


if __name__ == "__main__":
    main()
