"""External validation through the service: a Kermany-trained model scored on PneumoniaMNIST's test set.

    python benchmarks/quality.py kermany          # first: trains benchmarks/work/quality_kermany/model
    python benchmarks/external_shift.py [--concurrency 8] [--calibrate 0.3]

The model trained by `quality.py kermany` (kermany224, patient-level split, at that script's input
size) is served by a real `bentoml serve` on 127.0.0.1 (CXR_MODEL_URI = its model directory, its
MLflow store for the internal test metrics). PneumoniaMNIST's official test images (624, 28 px,
none of them in Kermany's training set) are exported as PNG files in NORMAL/ and PNEUMONIA/ folders
and sent through `cxr evaluate-external --url`. The shift is real: another resolution (28 px,
upsampled by the model's own preprocessing) and the Kermany test patients rather than the training ones.
With ``--calibrate N|fraction``, a site threshold is chosen on that part of the set and both operating points
(the model's threshold and the site's) are reported on the rest, as `cxr evaluate-external --calibrate` does.
Never the other way round: PneumoniaMNIST's training images are Kermany's training images.
Writes results/external_shift.json (metrics, internal-vs-external drop, wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from common import WORK, require_shared, write_result
from support.serve_process import ServiceProcess

METRICS = ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")


def export_pngs(npz: Path, out: Path) -> int:
    """The official test split as PNG files in label folders (what a hospital would hand over)."""
    data = np.load(npz)
    images, labels = data["test_images"], data["test_labels"].ravel()
    for name in ("NORMAL", "PNEUMONIA"):
        (out / name).mkdir(parents=True, exist_ok=True)
    for i, (img, y) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(out / ("PNEUMONIA" if y else "NORMAL") / f"pmnist_test_{i:04d}.png")
    return len(images)


def _operating_points(part: dict) -> str:
    """Sensitivity and specificity at the model's and the site's threshold, on the evaluation part."""

    def at(which: str) -> str:
        p = part["operating_points"][which]
        return ", ".join(
            f"{k} {p[k]['value']:.3f} [{p[k]['ci_low']:.3f}, {p[k]['ci_high']:.3f}]"
            for k in ("sensitivity", "specificity")
        )

    t, n = part["thresholds"], part["split"]["evaluation"]["scored"]
    return f"on {n} evaluation images: model threshold {t['model']:.4f}: {at('model')}; site threshold {t['site']:.4f}: {at('site')}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--calibrate", help="images or fraction of the set that choose a site threshold (e.g. 0.3)")
    args = ap.parse_args()
    trained = WORK / "quality_kermany"
    model_dir = trained / "model"
    if not (model_dir / "model.json").exists():
        sys.exit(f"no model at {model_dir}: run `python benchmarks/quality.py kermany` first")
    work = WORK / "external_shift"
    images = work / "pneumoniamnist_test"
    n = export_pngs(require_shared("pneumoniamnist", "pneumoniamnist.npz"), images)
    store = {
        "mlflow": {
            "tracking_uri": f"sqlite:///{trained / 'mlflow.db'}",
            "artifact_location": str(trained / "mlartifacts"),
        }
    }
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump(store))  # the service's MLflow store: the training run's internal metrics

    server = ServiceProcess(work, work / "serve.log", CXR_MODEL_URI=str(model_dir), CXR_BATCHING="1")
    try:
        server.wait_ready()
        out = work / "out"
        cmd = [
            sys.executable,
            "-m",
            "cxr",
            "evaluate-external",
            "--url",
            server.url,
            "--data",
            str(images),
            "--out",
            str(out),
            "--concurrency",
            str(args.concurrency),
            "-s",
            f"mlflow.tracking_uri={store['mlflow']['tracking_uri']}",
            "-s",
            f"mlflow.artifact_location={store['mlflow']['artifact_location']}",
        ]
        cmd += ["--calibrate", args.calibrate] if args.calibrate else []
        for cached in (out / "responses.jsonl",):  # measure a cold run, not a resumed one
            cached.unlink(missing_ok=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "CXR_NO_PROGRESS": "1"})
        seconds = time.perf_counter() - t0
    finally:
        server.stop()
    report = json.loads((out / "report" / "external.json").read_text())
    info = json.loads((model_dir / "model.json").read_text())
    compared = report["comparison"].get("metrics", {})

    def pair(k: str) -> str:
        c = compared.get(k)
        if not c:
            return f"{k} {report['metrics'][k]['value']:.3f}"
        e = c["external"]
        return f"{k} {c['internal']['value']:.3f} -> {e['value']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]"

    figures = {
        "model": {
            "trained_on": "kermany224 (patient-level split)",
            "arch": info["architecture"].get("arch"),
            "input_px": info["preprocess"]["size"],
            "threshold": info["threshold"],
        },
        "external_set": f"PneumoniaMNIST official test split, {n} PNG files (28 px)",
        "endpoint": f"{server.url}/predict (bentoml serve, adaptive batching)",
        "concurrency": args.concurrency,
        "wall_seconds": round(seconds, 1),
        "images_per_second": round(n / seconds, 1),
        "report": {k: v for k, v in report.items() if k not in ("predictions",)},
        "summary": (
            f"{info['architecture'].get('arch')} {info['preprocess']['size']} px trained on kermany224, served, "
            f"{n} PneumoniaMNIST test PNGs in {seconds:.1f} s at concurrency {args.concurrency} "
            f"({report['requests']['failed']} failed); internal test -> external: "
            + ", ".join(pair(k) for k in ("auroc", "accuracy", "sensitivity", "specificity"))
        ),
    }
    if report.get("site_calibration"):
        figures["summary_site"] = _operating_points(report["site_calibration"])
    write_result("external_shift", figures)
    print(json.dumps(list(report), indent=1))


if __name__ == "__main__":
    main()
