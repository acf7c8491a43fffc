"""How far can averaging the networks already trained go? A diagnostic for the PneumoniaMNIST test target.

    python benchmarks/ensemble_ceiling.py                     # every quality_pneumoniamnist* run in benchmarks/work
    python benchmarks/ensemble_ceiling.py RUN RUN ... --max-members 3

Loads the saved models of each named `quality.py` run (`benchmarks/work/<run>/model`, and for a `--seeds`
run each seed's `model_seed<N>`, named `<run>:seed<N>`; older `--seeds` runs kept only the last seed's
network, as `model`), scores its own prepared validation and test films (each model carries its own
preprocessing and input size, so networks of different sizes and architectures can be averaged), and
averages the probabilities of every combination of 2 .. --max-members of them. Reports each combination's
validation and test AUROC, the one validation would pick, and the best in hindsight on test. The
hindsight figure is chosen on test: it bounds what averaging these networks can give, and is never a result.
Writes benchmarks/results/ensemble_ceiling.json.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from common import WORK, write_result
from cxr.data.loader import PreparedData
from cxr.evaluation.evaluate import score_split
from cxr.models.predictor import Predictor

PREFIX = "quality_pneumoniamnist"


def saved_networks(run: str) -> dict[str, Path]:
    """The run's saved models by member name: ``run`` for model/, ``run:seed<N>`` for model_seed<N>/."""
    dirs = sorted(p.parent for p in (WORK / run).glob("model*/model.json"))
    return {run if d.name == "model" else f"{run}:{d.name.removeprefix('model_')}": d for d in dirs}


def member_scores(run: str, model_dir: Path) -> dict:
    predictor = Predictor.from_dir(model_dir)
    data = PreparedData(WORK / run / "prepared", predictor.spec.size)
    arch = predictor.card.architecture
    if arch["arch"] == "ensemble":  # a train.ensemble run's model
        arch = {"arch": f"{arch['members'][0]['arch']} x{len(arch['members'])}"}
    out = {"arch": arch["arch"], "size": predictor.spec.size}
    for split in ("val", "test"):
        _, y, p = score_split(predictor, data, split)
        out[split] = (np.asarray(y).ravel(), np.asarray(p).ravel())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help=f"quality.py run names (default: every {PREFIX}* with a saved model)")
    ap.add_argument("--max-members", type=int, default=3)
    args = ap.parse_args()
    named = args.runs or sorted({p.parents[1].name for p in WORK.glob(f"{PREFIX}*/model*/model.json")})
    networks = {member: (run, d) for run in named for member, d in saved_networks(run).items()}
    names = list(networks)  # one member per saved network
    if len(names) < 2:
        sys.exit(f"need at least 2 saved models under {WORK}; run benchmarks/quality.py first")
    scores = {member: member_scores(run, d) for member, (run, d) in networks.items()}
    for split in ("val", "test"):  # every run prepared the same official split, film for film
        y = scores[names[0]][split][0]
        if any(not np.array_equal(scores[n][split][0], y) for n in names):
            sys.exit(f"the runs' {split} films differ: not the same dataset")

    def auroc(combo: tuple[str, ...], split: str) -> float:
        y = scores[combo[0]][split][0]
        return round(float(roc_auc_score(y, np.mean([scores[r][split][1] for r in combo], axis=0))), 4)

    members = [
        {
            "run": r,
            "arch": scores[r]["arch"],
            "size": scores[r]["size"],
            "val_auroc": auroc((r,), "val"),
            "test_auroc": auroc((r,), "test"),
        }
        for r in names
    ]
    largest = min(args.max_members, len(names))
    combos = [
        {"runs": list(c), "val_auroc": auroc(c, "val"), "test_auroc": auroc(c, "test")}
        for k in range(2, largest + 1)
        for c in itertools.combinations(names, k)
    ]
    by_val = max(combos, key=lambda c: c["val_auroc"])
    hindsight = max(combos, key=lambda c: c["test_auroc"])
    singles, averaged = [m["test_auroc"] for m in members], [c["test_auroc"] for c in combos]
    summary = (
        f"{len(names)} networks alone: test AUROC {min(singles):.4f}-{max(singles):.4f}; {len(combos)} averages of "
        f"2-{largest}: {min(averaged):.4f}-{max(averaged):.4f} (median "
        f"{np.median(averaged):.4f}); picked by validation {by_val['test_auroc']:.4f}; best in hindsight on test "
        f"{hindsight['test_auroc']:.4f} ({' + '.join(r.removeprefix(PREFIX + '_') for r in hindsight['runs'])})"
    )
    write_result(
        "ensemble_ceiling",
        {
            "summary": summary,
            "members": members,
            "picked_by_validation": by_val,
            "best_in_hindsight_on_test": hindsight,
            "combinations": combos,
        },
    )


if __name__ == "__main__":
    main()
