"""Tuning: epochs and wall time of the same study with and without pruning, on PneumoniaMNIST at 28 px.

    python benchmarks/tuning.py [--trials 6] [--epochs 10]

Both arms run `cxr.tune.tune` with the same seeded TPE sampler and search space; one uses the median
pruner, the other none. The best parameters of the pruned arm are written to
benchmarks/results/tuned_pneumoniamnist.yaml, which `quality.py pneumoniamnist --tuned` trains with.
Writes benchmarks/results/tuning.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import yaml
from common import RESULTS, WORK, require_shared, write_result

from cxr.config import load_config
from cxr.data.ingest import ingest
from cxr.data.prepare import prepare
from cxr.tune import tune

SPACE = {
    "train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
    "train.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "model.width": {"type": "categorical", "choices": [24, 32, 48]},
    "train.augment.strength": {"type": "float", "low": 0.3, "high": 1.5},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    os.environ.setdefault("CXR_NO_PROGRESS", "1")
    work = WORK / "tuning"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = load_config(overrides={
        "data.source": "medmnist", "data.path": str(require_shared("pneumoniamnist", "pneumoniamnist.npz")),
        "prepare.sizes": [28], "model.image_size": 28,
        "paths.raw": str(work / "raw"), "paths.prepared": str(work / "prepared"),
        "paths.model": str(work / "model"), "paths.reports": str(work / "reports"),
        "mlflow.tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "mlflow.artifact_location": str(work / "mlartifacts"),
        "train.epochs": args.epochs, "train.early_stopping.patience": args.epochs,
        "tune.space": SPACE, "tune.startup_trials": 2, "tune.warmup_epochs": 3, "tune.log_models": False,
    })
    ingest(base)
    prepare(base)
    arms = {}
    for pruner in ("median", "none"):
        cfg = base.override({"tune.pruner": pruner})
        t0 = time.perf_counter()
        result = tune(cfg, args.trials, study_name=f"bench-{pruner}", storage_url=f"sqlite:///{work / 'optuna.db'}")
        seconds = time.perf_counter() - t0
        import optuna

        trials = optuna.load_study(study_name=f"bench-{pruner}", storage=f"sqlite:///{work / 'optuna.db'}").trials
        arms[pruner] = {
            "wall_seconds": round(seconds, 1),
            "epochs": sum(int(t.user_attrs.get("epochs_trained", 0)) for t in trials),
            "complete": result.n_complete, "pruned": result.n_pruned,
            "best_val_auroc": round(result.best_value, 4), "best_params": result.best_params,
        }
    pruned, full = arms["median"], arms["none"]
    (RESULTS / "tuned_pneumoniamnist.yaml").write_text(yaml.safe_dump(pruned["best_params"], sort_keys=True))
    figures = {
        "dataset": "pneumoniamnist", "image_size": 28, "trials": args.trials, "max_epochs": args.epochs,
        "space": SPACE, "arms": arms,
        "epochs_ratio_pruned_vs_none": round(pruned["epochs"] / max(full["epochs"], 1), 3),
        "time_ratio_pruned_vs_none": round(pruned["wall_seconds"] / max(full["wall_seconds"], 1e-9), 3),
        "summary": (f"{args.trials} trials x <= {args.epochs} epochs: median pruner {pruned['epochs']} epochs in "
                    f"{pruned['wall_seconds']} s ({pruned['pruned']} pruned, best val AUROC {pruned['best_val_auroc']}) "
                    f"vs no pruning {full['epochs']} epochs in {full['wall_seconds']} s "
                    f"(best {full['best_val_auroc']})"),
    }
    write_result("tuning", figures)


if __name__ == "__main__":
    main()
