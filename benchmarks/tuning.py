"""Tuning: the same study with and without pruning, on PneumoniaMNIST at 28 px, then the promoted model.

    python benchmarks/tuning.py                                      # 50 trials x <= 10 epochs per arm (~60 min)
    python benchmarks/tuning.py --trials 6 --epochs 4 --name tuning_quick   # the `make bench` default set
    python benchmarks/tuning.py --resume                             # continue interrupted studies
    python benchmarks/tuning.py --resume --pruners percentile@1,hyperband@1,median  # more arms, same studies

Every arm runs `cxr.tune.tune` with the same seeded TPE sampler, search space and objective (the configured
`tune.objective`: AUROC on augmented validation copies): the pruned arms (`--pruners`, default the percentile
pruner from epoch 2) and one without pruning. Each arm reports epochs trained, time, the best objective and the
best clean validation AUROC; time is the sum of its finished (complete or pruned)
trials' durations, so an interrupted and resumed study is measured the same as one run straight through (a
trial killed by the interruption counts as failed and is left out of both epochs and time). Every
complete trial's logged model is scored on the official test split, to show how well the ranking by the
objective and by clean validation (in-distribution, cut from Kermany's training set) carry over to the
shifted test set.
The best trial of the first pruned arm is then registered and promoted to `champion` (`cxr register` /
`cxr promote` code paths) and its test metrics at the validation threshold are reported.
Its parameters go to results/tuned_pneumoniamnist.yaml, which `quality.py pneumoniamnist --tuned`
retrains with. Writes results/<name>.json.
"""

from __future__ import annotations

import argparse
import os
import shutil

import numpy as np
import yaml

from common import RESULTS, WORK, pneumoniamnist, work_paths, write_result
from cxr.config import load_config
from cxr.data.ingest import ingest
from cxr.data.loader import PreparedData
from cxr.data.prepare import prepare
from cxr.tracking import registry
from cxr.tracking.uris import load_predictor
from cxr.tuning.study import register_best, tune

SPACE = {
    "train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
    "train.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
    "train.batch_size": {"type": "categorical", "choices": [32, 64, 128]},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "model.width": {"type": "categorical", "choices": [24, 32, 48]},
    "train.augment.strength": {"type": "float", "low": 0.3, "high": 3.0},
    "train.label_smoothing": {"type": "float", "low": 0.0, "high": 0.1},
}


def test_auroc_per_trial(study, data: PreparedData) -> list[dict]:
    """The objective and clean validation AUROC beside official-test AUROC for every complete trial."""
    from sklearn.metrics import roc_auc_score

    idx = data.split("test")
    rows = []
    for t in study.trials:
        if t.state.name != "COMPLETE" or "mlflow_run_id" not in t.user_attrs:
            continue
        predictor = load_predictor(f"runs:/{t.user_attrs['mlflow_run_id']}/model")
        probs = predictor.predict_proba(data.images[idx]).reshape(len(idx), -1)[:, -1]  # P(positive)
        rows.append(
            {
                "trial": t.number,
                "objective": round(t.value, 4),
                "val_auroc": round(t.user_attrs.get("val_auroc", float("nan")), 4),
                "test_auroc": round(float(roc_auc_score(data.targets[idx].ravel(), probs)), 4),
            }
        )
    return rows


def ranking_carry_over(rows: list[dict]) -> dict:
    from scipy.stats import spearmanr

    if len(rows) < 3:
        return {"n": len(rows)}
    objective = np.array([r["objective"] for r in rows])
    clean = np.array([r["val_auroc"] for r in rows])
    test = np.array([r["test_auroc"] for r in rows])
    best = int(np.argmax(objective))
    return {
        "n": len(rows),
        "spearman_objective_vs_test": round(float(spearmanr(objective, test).statistic), 3),
        "spearman_clean_val_vs_test": round(float(spearmanr(clean, test).statistic), 3),
        "best_trial": rows[best]["trial"],
        "best_trial_test_auroc": float(test[best]),
        "best_trial_test_rank": int((test > test[best]).sum()) + 1,
        "best_clean_val_trial_test_auroc": float(test[int(np.argmax(clean))]),
        "best_test_auroc_any_trial": float(test.max()),
    }


def parse_arm(spec: str) -> tuple[str, str, int]:
    """``median`` or ``hyperband@1`` -> (arm label, pruner, warm-up epochs; default 3)."""
    pruner, _, warmup = spec.partition("@")
    if pruner not in ("median", "percentile", "hyperband"):
        raise argparse.ArgumentTypeError(f"unknown pruner {pruner!r}: median, percentile or hyperband")
    return (spec if warmup else pruner), pruner, int(warmup or 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument(
        "--pruners",
        default="percentile@1",
        type=lambda v: [parse_arm(spec) for spec in v.split(",")],
        help="pruned arms, comma-separated: median | percentile (keeps the top 25%%) | hyperband, optionally "
        "@warm-up epochs (default 3; hyperband's smallest rung), e.g. median,hyperband@1. "
        "The first arm's best trial is promoted.",
    )
    ap.add_argument("--name", default="tuning", help="result file name (results/<name>.json)")
    ap.add_argument(
        "--resume", action="store_true", help="keep the studies in benchmarks/work/<name> and continue them"
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="run no trials: report the studies in benchmarks/work/<name> as they are (partial if cut short)",
    )
    args = ap.parse_args()
    os.environ.setdefault("CXR_NO_PROGRESS", "1")
    work = WORK / args.name
    if not (args.resume or args.report_only):
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{work / 'optuna.db'}"
    base = load_config(
        overrides={
            **pneumoniamnist(28),
            **work_paths(work),
            "train.epochs": args.epochs,
            "train.early_stopping.patience": args.epochs,
            "tune.space": SPACE,
            "tune.startup_trials": 5,
            "tune.warmup_epochs": 3,
            "tune.log_models": True,
        }
    )
    ingest(base)
    prepare(base)
    data = PreparedData(base.paths.prepared, 28)
    import optuna

    arms, results, configs = {}, {}, {}
    for label, pruner, warmup in [*args.pruners, ("none", "none", 3)]:
        configs[label] = cfg = base.override({"tune.pruner": pruner, "tune.warmup_epochs": warmup})
        study_name = f"bench-{label.replace('@', '-w')}"
        if args.report_only:  # as many trials as the study has finished: tune() then only summarises
            study = optuna.load_study(study_name=study_name, storage=storage)
            n = min(args.trials, sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials))
        else:
            n = args.trials
        results[label] = result = tune(cfg, n, study_name=study_name, storage_url=storage)
        study = optuna.load_study(study_name=study_name, storage=storage)
        finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
        seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in finished)
        per_trial = test_auroc_per_trial(study, data)
        arms[label] = {
            "pruner": pruner,
            "warmup_epochs": warmup,
            "finished_trials": len(finished),
            "trial_seconds": round(seconds, 1),
            "epochs": sum(int(t.user_attrs.get("epochs_trained", 0)) for t in finished),
            "complete": result.n_complete,
            "pruned": result.n_pruned,
            "failed": result.n_failed,
            "best_objective": round(result.best_value, 4),
            "best_val_auroc": round(
                max(t.user_attrs.get("val_auroc", 0.0) for t in finished if t.state.name == "COMPLETE"), 4
            ),
            "best_params": result.best_params,
            "val_to_test": ranking_carry_over(per_trial),
            "trials": per_trial,
        }
        print(
            f"== {label}: {arms[label]['epochs']} epochs, {seconds:.0f} s, best objective {result.best_value:.4f}",
            flush=True,
        )
    full = arms["none"]
    first = args.pruners[0][0]

    # The first pruned arm's best trial, registered and promoted the way a team would do it.
    # A resumed run registers another version; the gate may then keep an earlier, better champion.
    version = register_best(configs[first], results[first])
    try:
        gate, moved = registry.promote(base, version).reason, True
    except registry.PromotionRefused as refused:
        gate, moved = str(refused), False
    from mlflow import MlflowClient

    tags = MlflowClient().get_model_version(base.mlflow.registered_model, version).tags
    promoted = {
        "arm": first,
        "version": version,
        "alias": base.registry.alias,
        "promoted": moved,
        "gate": gate,
        **{
            k: float(tags[k])
            for k in ("val_auroc", "threshold", "test_auroc", "test_accuracy", "test_sensitivity", "test_specificity")
            if k in tags
        },
    }
    # only the full study's result feeds `quality.py --tuned`; a quick run must not overwrite it
    tuned = RESULTS / "tuned_pneumoniamnist.yaml" if args.name == "tuning" else work / "tuned_pneumoniamnist.yaml"
    tuned.write_text(yaml.safe_dump(arms[first]["best_params"], sort_keys=True))

    def fmt(x):
        return "n/a" if x is None else f"{float(x):.4f}"

    comparison, parts = {}, []
    for label, _, _ in args.pruners:
        arm = arms[label]
        comparison[label] = {
            "epochs_ratio_none_vs_pruned": round(full["epochs"] / max(arm["epochs"], 1), 2),
            "time_ratio_none_vs_pruned": round(full["trial_seconds"] / max(arm["trial_seconds"], 1e-9), 2),
            "best_objective_gap_none_minus_pruned": round(full["best_objective"] - arm["best_objective"], 4),
            "best_val_gap_none_minus_pruned": round(full["best_val_auroc"] - arm["best_val_auroc"], 4),
        }
        parts.append(
            f"{label} pruner {arm['epochs']} epochs in {arm['trial_seconds']:.0f} s ({arm['pruned']} of "
            f"{arm['finished_trials']} pruned, best objective {arm['best_objective']}, "
            f"best clean val AUROC {arm['best_val_auroc']}, "
            f"{comparison[label]['epochs_ratio_none_vs_pruned']}x fewer epochs)"
        )
    figures = {
        "dataset": "pneumoniamnist",
        "image_size": 28,
        "trials": args.trials,
        "max_epochs": args.epochs,
        "objective": f"{base.tune.objective} ({base.tune.objective_copies} copies, strength {base.train.augment.strength})",
        "space": SPACE,
        "arms": arms,
        "comparison": comparison,
        "promoted": promoted,
        "summary": (
            f"<= {args.trials} trials x <= {args.epochs} epochs: "
            + "; ".join(parts)
            + f"; none {full['epochs']} epochs in {full['trial_seconds']:.0f} s ({full['finished_trials']} trials, "
            f"best objective {full['best_objective']}, clean val {full['best_val_auroc']}); best of {first} v{version} ({'promoted' if moved else 'not promoted'}): test AUROC "
            f"{fmt(promoted.get('test_auroc'))}, accuracy {fmt(promoted.get('test_accuracy'))}; objective->test Spearman "
            + ", ".join(
                f"{lab} {a['val_to_test'].get('spearman_objective_vs_test')} (clean val "
                f"{a['val_to_test'].get('spearman_clean_val_vs_test')})"
                for lab, a in arms.items()
            )
        ),
    }
    write_result(args.name, figures)


if __name__ == "__main__":
    main()
