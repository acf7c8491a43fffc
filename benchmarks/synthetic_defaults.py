"""Choose ``train.augment.strength`` for the synthetic source (the shipped default) on validation only.

    python benchmarks/synthetic_defaults.py                       # 3 strengths x 6 seeds, ~25 min on 2 cores
    python benchmarks/synthetic_defaults.py --strengths 1,3 --seeds 42,1

Why: strength 3.0 was chosen on PneumoniaMNIST validation (benchmarks/defaults_protocol.py). On the 64-px
synthetic films `dvc repro` with it sat at chance for 10-20 epochs and learnt only as the learning rate fell,
so whether it reached 0.9 by epoch 30 depended on the seed and on the CPU's rounding (issue 33: val AUROC 0.70
on one machine, 0.96 on another, for one commit and seed). A default must learn with margin.

The protocol, declared before any result: for each candidate strength and each seed (42, the shipped one, and
1-5: each cuts its own patient split, initialises and augments differently), the default `dvc repro` stages
``prepare`` and ``train`` with params.yaml as shipped but for ``project.seed`` and the strength. The figure is
the saved epoch's validation AUROC. The test split is never scored here. Choice: among candidates whose every
seed reaches ``TARGET``, the highest mean; within ``TIE`` of it, the largest strength (more augmentation is more
robust to other sites' films, and nearer real films' 3.0). No candidate reaching it on every seed: nothing is
chosen, the JSON says so.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics

from common import REPO, WORK, run_cxr, write_result

STRENGTHS = (1.0, 2.0, 3.0)
SEEDS = (42, 1, 2, 3, 4, 5)
TARGET = 0.90
TIE = 0.005


def val_auroc(work, seed: int, strength: float) -> dict:
    """Train the default on ``seed``'s prepared split at ``strength``; what its saved epoch reached."""
    model = f"model_{strength}_{seed}"
    settings = {"project.seed": seed, "paths.prepared": f"prepared_{seed}", "paths.model": model}
    run_cxr(work, "train", {**settings, "train.augment.strength": strength})
    card = json.loads((work / model / "model.json").read_text())["training"]
    return {"val_auroc": round(card["val_auroc"], 4), "best_epoch": card["best_epoch"]}


def choose(by_strength: dict[float, list[float]]) -> float | None:
    passing = {s: statistics.mean(v) for s, v in by_strength.items() if min(v) >= TARGET}
    if not passing:
        return None
    best = max(passing.values())
    return max(s for s, m in passing.items() if m >= best - TIE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strengths", default=",".join(map(str, STRENGTHS)))
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    args = ap.parse_args()
    strengths, seeds = [float(s) for s in args.strengths.split(",")], [int(s) for s in args.seeds.split(",")]
    work = WORK / "synthetic_defaults"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", work)
    run_cxr(work, "ingest", {})
    for seed in seeds:
        run_cxr(work, "prepare", {"project.seed": seed, "paths.prepared": f"prepared_{seed}"})
    runs = {s: {seed: val_auroc(work, seed, s) for seed in seeds} for s in strengths}
    by_strength = {s: [r["val_auroc"] for r in runs[s].values()] for s in strengths}
    chosen = choose(by_strength)
    table = {
        str(s): {"min": min(v), "mean": round(statistics.mean(v), 4), "per_seed": runs[s]}
        for s, v in by_strength.items()
    }
    write_result(
        "synthetic_defaults",
        {
            "summary": f"val AUROC by strength (min / mean over seeds {args.seeds}): "
            + ", ".join(f"{s}: {t['min']:.3f} / {t['mean']:.3f}" for s, t in table.items())
            + f"; chosen: {chosen} (every seed >= {TARGET}, then the highest mean, ties to the larger)",
            "strengths": table,
            "chosen": chosen,
            "seeds": seeds,
            "rule": f"every seed >= {TARGET}; highest mean; within {TIE}, the largest strength",
            "test_split_read": False,
        },
    )


if __name__ == "__main__":
    main()
