"""A cross-architecture ensemble on PneumoniaMNIST, made as `cxr ensemble` makes one, scored on test once.

    python benchmarks/ensemble_weighted.py                # the mlp, random_forest and seed-1 simple_cnn quality runs
    python benchmarks/ensemble_weighted.py RUN RUN ...    # any quality.py runs' saved models (benchmarks/work/RUN/model)

Combines the runs' saved models with cxr.training.combine.combine on the first run's prepared data: the weights
minimise the validation log loss, the threshold and the out-of-distribution check come from validation and
training films. Then the ensemble is evaluated (cxr.evaluation.evaluate) on the official test split, read once here,
beside each member's test AUROC from its own quality.py result. Writes benchmarks/results/ensemble_weighted.json.
"""

from __future__ import annotations

import argparse
import json

from common import RESULTS, WORK, pneumoniamnist, work_paths, write_result
from cxr.config import load_config
from cxr.evaluation.evaluate import evaluate
from cxr.models.predictor import read_card
from cxr.training.combine import combine

DEFAULT_RUNS = [
    "quality_pneumoniamnist_mlp",
    "quality_pneumoniamnist_random_forest",
    "quality_pneumoniamnist_backbone_seed1",
]


def member_test_auroc(run: str) -> float | None:
    result = RESULTS / f"{run}.json"
    return json.loads(result.read_text())["figures"]["test"]["auroc"]["value"] if result.exists() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", default=DEFAULT_RUNS, help="quality.py run names")
    ap.add_argument("--name", default="ensemble_weighted")
    args = ap.parse_args()
    work = WORK / args.name
    paths = work_paths(work) | {"paths.prepared": str(WORK / args.runs[0] / "prepared"), "mlflow.enabled": False}
    cfg = load_config(overrides={**pneumoniamnist(28), **paths})
    result = combine(cfg, [str(WORK / run / "model") for run in args.runs])
    members = read_card(result.model_dir).training.members or []
    test = evaluate(cfg, str(result.model_dir))["splits"]["test"]
    figures = {
        "members": [
            {
                "run": run,
                "arch": m.arch,
                "image_size": m.image_size,
                "weight": round(m.weight or 0, 4),
                "val_auroc_as_fed": round(m.val_auroc, 4),
                "test_auroc_alone": member_test_auroc(run),
            }
            for run, m in zip(args.runs, members)
        ],
        "val_auroc": round(result.best_val_auroc, 4),
        "threshold": result.threshold,
        "test": {k: test[k] for k in ("auroc", "accuracy", "sensitivity", "specificity", "f1")},
        "test_n": test["n"],
    }
    auroc = test["auroc"]
    weights = ", ".join(f"{m['arch']} {m['weight']:.2f}" for m in figures["members"])
    figures["summary"] = (
        f"weights on validation ({weights}): val AUROC {figures['val_auroc']}, test AUROC {auroc['value']:.4f} "
        f"[{auroc['ci_low']:.4f}, {auroc['ci_high']:.4f}]"
    )
    print(write_result(args.name, figures))
    print(figures["summary"])


if __name__ == "__main__":
    main()
