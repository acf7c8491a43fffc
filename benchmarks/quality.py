"""Quality with the default CPU config: PneumoniaMNIST official test split, and Kermany-224 patient-level.

    python benchmarks/quality.py pneumoniamnist      # default config at 28 px (MedMNIST's resolution)
    python benchmarks/quality.py kermany [--size 64]  # Kermany train set, patient-level split cut by prepare
    python benchmarks/quality.py pneumoniamnist --tuned  # with the params tuning.py found

Writes benchmarks/results/quality_<dataset>.json with test metrics, wall times and the MedMNIST v2 table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import yaml
from common import RESULTS, WORK, require_shared, write_result

from cxr.config import load_config
from cxr.data.ingest import ingest
from cxr.data.prepare import prepare
from cxr.evaluate import evaluate
from cxr.train import fit

MEDMNIST_V2 = {  # Table 3 of the MedMNIST v2 paper, PneumoniaMNIST test AUC / ACC
    "ResNet-18 (28)": (0.944, 0.854), "ResNet-18 (224)": (0.956, 0.864), "ResNet-50 (28)": (0.948, 0.854),
    "ResNet-50 (224)": (0.962, 0.884), "auto-sklearn": (0.942, 0.855), "AutoKeras": (0.947, 0.878),
    "Google AutoML Vision": (0.991, 0.946),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=["pneumoniamnist", "kermany"])
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("-s", "--set", action="append", default=[], help="extra dotted overrides")
    ap.add_argument("--tuned", action="store_true", help="train with results/tuned_<dataset>.yaml (from tuning.py)")
    args = ap.parse_args()
    name = f"quality_{args.dataset}" + ("_tuned" if args.tuned else "")
    if args.tuned:
        tuned = RESULTS / f"tuned_{args.dataset}.yaml"
        if not tuned.exists():
            sys.exit(f"{tuned} missing: run benchmarks/tuning.py first")
        args.set = [f"{k}={v}" for k, v in yaml.safe_load(tuned.read_text()).items()] + args.set
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    if args.dataset == "pneumoniamnist":
        size = args.size or 28
        data = {"data.source": "medmnist", "data.path": str(require_shared("pneumoniamnist", "pneumoniamnist.npz"))}
    else:
        size = args.size or 64
        data = {"data.source": "kermany", "data.path": str(require_shared("kermany224"))}
    overrides = {
        **data,
        "prepare.sizes": [size], "model.image_size": size,
        "paths.raw": str(work / "raw"), "paths.prepared": str(work / "prepared"),
        "paths.model": str(work / "model"), "paths.reports": str(work / "reports"),
        "mlflow.tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "mlflow.artifact_location": str(work / "mlartifacts"),
    }
    cfg = load_config(overrides=overrides).override(args.set)
    os.environ.setdefault("CXR_NO_PROGRESS", "1")
    t0 = time.perf_counter()
    ingest(cfg)
    prepare(cfg)
    t_prep = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = fit(cfg, log_model=False)
    t_train = time.perf_counter() - t0
    report = evaluate(cfg)
    test = report["splits"]["test"]
    figures = {
        "dataset": args.dataset,
        "image_size": size,
        "arch": cfg.model.arch,
        "overrides": args.set,
        "ingest_prepare_seconds": round(t_prep, 1),
        "train_seconds": round(t_train, 1),
        "epochs_trained": result.epochs_trained,
        "best_epoch": result.best_epoch,
        "train_images_per_second": round(result.images_per_second, 1),
        "val_auroc": round(result.best_val_auroc, 4),
        "threshold": result.threshold,
        "test": {k: test[k] for k in ("auroc", "accuracy", "sensitivity", "specificity", "f1")},
        "test_n": test["n"],
    }
    if args.dataset == "pneumoniamnist":
        figures["medmnist_v2_table_auc_acc"] = MEDMNIST_V2
        figures["targets"] = {"auroc": 0.98, "accuracy": 0.93, "train_seconds": 300}
    write_result(name, figures)


if __name__ == "__main__":
    main()
