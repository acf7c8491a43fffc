"""Quality with the default CPU config: PneumoniaMNIST official test split, and Kermany-224 patient-level.

    python benchmarks/quality.py pneumoniamnist      # default config at 28 px (MedMNIST's resolution)
    python benchmarks/quality.py kermany [--size 64]  # Kermany train set, patient-level split cut by prepare
    python benchmarks/quality.py pneumoniamnist --tuned  # with the params tuning.py found
    python benchmarks/quality.py pneumoniamnist --tuned benchmarks/work/tuning_amd/tuned_pneumoniamnist.yaml --name ...
        # the params a named tuning run found (tuning.py --name tuning_amd)
    python benchmarks/quality.py pneumoniamnist --seeds 1,2,3,4,5  # the same config under 5 seeds (reliability)
    python benchmarks/quality.py pneumoniamnist --seeds 42,1,2 -s model.tta_views=8 --name quality_pneumoniamnist_tta
        # any overrides; with test-time views, each network's test AUROC is also reported without them
    python benchmarks/quality.py pneumoniamnist --tuned --trace --name quality_pneumoniamnist_tuned_trace
        # also every epoch's test AUROC: would another epoch have carried over better? (diagnostic only)

Writes benchmarks/results/quality_<dataset>.json with test metrics, wall times and the MedMNIST v2 table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from scipy.special import logit
from sklearn.metrics import roc_curve

from common import RESULTS, WORK, pneumoniamnist, require_shared, work_paths, write_result
from cxr.config import REAL_FILMS_AUGMENT_STRENGTH, load_config
from cxr.data.ingest import ingest
from cxr.data.loader import PreparedData
from cxr.data.prepare import prepare
from cxr.evaluation.evaluate import evaluate, score_split
from cxr.evaluation.metrics import choose_threshold
from cxr.models.predictor import Predictor
from cxr.training.callbacks import EpochFigures
from cxr.training.fit import fit

MEDMNIST_V2 = {  # Table 3 of the MedMNIST v2 paper, PneumoniaMNIST test AUC / ACC
    "ResNet-18 (28)": (0.944, 0.854),
    "ResNet-18 (224)": (0.956, 0.864),
    "ResNet-50 (28)": (0.948, 0.854),
    "ResNet-50 (224)": (0.962, 0.884),
    "auto-sklearn": (0.942, 0.855),
    "AutoKeras": (0.947, 0.878),
    "Google AutoML Vision": (0.991, 0.946),
}


def threshold_diagnostics(cfg) -> dict:
    """Diagnostics only, never used to choose anything: how each validation threshold rule fares.

    For ``youden`` and ``youden_kernel``, each on the clean validation films and on
    ``evaluate.threshold_augmented_copies`` augmented copies of them (``+aug``; the default uses
    ``youden_kernel+aug``): the threshold, its spread over 200 bootstrap resamples of the validation films
    (SD of the logit: how much a few films decide it) and the test accuracy at it. Plus the test accuracy
    at the best threshold in hindsight, which tells a ranking problem (this is low too) from a threshold
    that does not carry over to the shifted test split (this is high).
    """
    import torch

    from cxr.training.threshold import threshold_scores

    predictor = Predictor.from_dir(cfg.paths.model)
    data = PreparedData(cfg.paths.prepared, predictor.spec.size)
    (iv, yv, pv), (_, yt, pt) = (score_split(predictor, data, split) for split in ("val", "test"))
    yt, pt = np.asarray(yt).ravel(), np.asarray(pt).ravel()  # binary task: (N,) probabilities
    k = max(1, cfg.evaluate.threshold_augmented_copies)
    views = {"": (np.asarray(yv).ravel(), np.asarray(pv).ravel(), 1)}
    ya, pa = threshold_scores(
        predictor.model, data, iv, pv, cfg.override({"evaluate.threshold_augmented_copies": k}), torch.device("cpu")
    )
    views["+aug"] = (ya, pa, k)
    n = len(iv)
    rng = np.random.default_rng(0)
    resamples = [rng.integers(0, n, n) for _ in range(200)]
    rules = {}
    for suffix, (y, p, copies) in views.items():
        rows = [np.concatenate([i + c * n for c in range(copies)]) for i in resamples]  # a film with its copies
        for rule in ("youden", "youden_kernel"):
            t = choose_threshold(y, p, rule)
            spread = np.std([logit(choose_threshold(y[r], p[r], rule)) for r in rows])
            rules[rule + suffix] = {
                "threshold": round(t, 4),
                "val_bootstrap_sd_logit": round(float(spread), 3),
                "test_accuracy": round(float(np.mean((pt >= t) == yt)), 4),
            }
    fpr, tpr, thresholds = roc_curve(yt, pt)
    pos, neg = int(yt.sum()), int(yt.size - yt.sum())
    accuracy = (tpr * pos + (1 - fpr) * neg) / yt.size
    best = int(np.argmax(accuracy))
    rules["hindsight_best_on_test"] = {
        "threshold": round(float(thresholds[best]), 4),
        "test_accuracy": round(float(accuracy[best]), 4),
    }
    return rules


def epoch_trace(cfg, base_cfg) -> dict:
    """fit's arguments for a per-epoch trace (diagnostic only, never used to choose anything): the tuning
    objective's yardstick (augmented validation, as ``cxr tune`` builds it from the untuned config) and a hook
    scoring the validated model on the test split after every epoch."""
    import torch
    from sklearn.metrics import roc_auc_score

    from cxr.training.scoring import predict_split
    from cxr.tuning.storage import make_yardstick

    data = PreparedData(cfg.paths.prepared, cfg.model.image_size)
    test = data.split("test")

    def test_auroc(model) -> dict[str, float]:
        probs = predict_split(model, data, test, 256, torch.device("cpu"), data.task, cfg.train.precision)
        return {"test_auroc_diagnostic": float(roc_auc_score(data.targets[test], probs))}

    return {"yardstick": make_yardstick(base_cfg), "callbacks": [EpochFigures(test_auroc)]}


def trace_figures(history: list[dict], best_epoch: int) -> dict:
    """Each epoch's clean and augmented validation AUROC and test AUROC, and the test AUROC of the epoch
    each validation would pick, beside the best epoch in hindsight."""
    keys = {
        "val_auroc": "val_auroc",
        "val_auroc_augmented": "val_auroc_augmented",
        "test_auroc": "test_auroc_diagnostic",
    }
    rows = [{"epoch": e} | {k: round(r[v], 4) for k, v in keys.items() if v in r} for e, r in enumerate(history, 1)]
    chosen = {"saved epoch (train.early_stopping.monitor)": rows[best_epoch - 1]}
    if "val_auroc_augmented" in rows[0]:  # absent with tune.objective=val_auroc
        chosen["val_auroc_augmented"] = max(rows, key=lambda r: r["val_auroc_augmented"])
    chosen["hindsight_best_on_test"] = max(rows, key=lambda r: r["test_auroc"])
    return {
        "per_epoch": rows,
        "test_auroc_at_epoch_chosen_by": {k: [r["epoch"], r["test_auroc"]] for k, r in chosen.items()},
    }


def train_and_score(cfg, trace_of=None) -> dict:
    """Train with ``cfg``, evaluate on the test split: wall time, epochs and the test metrics. With
    ``trace_of`` (the untuned config), also the per-epoch trace of :func:`trace_figures`."""
    traced = epoch_trace(cfg, trace_of) if trace_of is not None else {}
    t0 = time.perf_counter()
    result = fit(cfg, log_model=False, **traced)
    t_train = time.perf_counter() - t0
    test = evaluate(cfg)["splits"]["test"]
    extra = {}
    if cfg.model.tta_views:  # paired: the same network scored without its test-time views
        from sklearn.metrics import roc_auc_score

        predictor = Predictor.from_dir(cfg.paths.model)
        data = PreparedData(cfg.paths.prepared, predictor.spec.size)
        predictor.model = predictor.model.network
        _, y, without = score_split(predictor, data, "test")
        extra["test_auroc_without_tta"] = round(float(roc_auc_score(y, without)), 4)
        extra["test_auroc_with_tta"] = round(test["auroc"]["value"], 4)  # evaluate's figure, the saved model
    if traced:
        extra |= trace_figures(result.history, result.best_epoch)
    return {
        "seed": cfg.project.seed,
        "train_seconds": round(t_train, 1),
        "epochs_trained": result.epochs_trained,
        "best_epoch": result.best_epoch,
        "train_images_per_second": round(result.images_per_second, 1),
        "val_auroc": round(result.best_val_auroc, 4),
        "threshold": result.threshold,
        "test": {k: test[k] for k in ("auroc", "accuracy", "sensitivity", "specificity", "f1")},
        "test_n": test["n"],
        "threshold_rules": threshold_diagnostics(cfg),
        **extra,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=["pneumoniamnist", "kermany"])
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("-s", "--set", action="append", default=[], help="extra dotted overrides")
    ap.add_argument(
        "--seeds",
        type=lambda v: [int(x) for x in v.split(",")],
        default=None,
        help="comma-separated seeds: train and score once per seed (writes quality_<dataset>_seeds.json)",
    )
    ap.add_argument(
        "--tuned",
        nargs="?",
        const="",
        default=None,
        metavar="YAML",
        help="train with the parameters tuning.py found: results/tuned_<dataset>.yaml, or the file "
        "given (a named run writes benchmarks/work/<name>/tuned_<dataset>.yaml)",
    )
    ap.add_argument("--name", default=None, help="result name (default quality_<dataset>[_tuned][_seeds])")
    ap.add_argument(
        "--trace",
        action="store_true",
        help="also score every epoch's model on validation (clean, augmented) and test (diagnostic)",
    )
    args = ap.parse_args()
    name = f"quality_{args.dataset}" + ("_tuned" if args.tuned is not None else "")
    own_sets = args.set
    if args.tuned is not None:
        tuned = Path(args.tuned) if args.tuned else RESULTS / f"tuned_{args.dataset}.yaml"
        if not tuned.exists():
            sys.exit(f"{tuned} missing: run benchmarks/tuning.py first")
        args.set = [f"{k}={v}" for k, v in yaml.safe_load(tuned.read_text()).items()] + args.set
    work = WORK / (args.name or name)
    work.mkdir(parents=True, exist_ok=True)
    if args.dataset == "pneumoniamnist":
        size = args.size or 28
        data = pneumoniamnist(size)
    else:
        size = args.size or 64
        data = {
            "data.source": "kermany",
            "data.path": str(require_shared("kermany224")),
            "train.augment.strength": REAL_FILMS_AUGMENT_STRENGTH,  # real films' default
        }
        data |= {"prepare.sizes": [size], "model.image_size": size}
    overrides = {**data, **work_paths(work)}
    cfg = load_config(overrides=overrides).override(args.set)
    # the yardstick as `cxr tune` builds it: from the config without the tuned parameters
    trace_of = load_config(overrides=overrides).override(own_sets) if args.trace else None
    if trace_of is not None and cfg.train.ensemble > 1:
        sys.exit("--trace follows one network: not with train.ensemble > 1")
    os.environ.setdefault("CXR_NO_PROGRESS", "1")
    t0 = time.perf_counter()
    ingest(cfg)
    prepare(cfg)
    t_prep = time.perf_counter() - t0
    figures = {
        "dataset": args.dataset,
        "image_size": size,
        "arch": cfg.model.arch,
        "ensemble": cfg.train.ensemble,
        "overrides": args.set,
        "ingest_prepare_seconds": round(t_prep, 1),
    }
    if args.seeds:
        # The same config under several seeds: is a target met reliably, or only by a lucky seed?
        name += "_seeds"
        # each seed keeps its own network (model_seed<N>/), so ensemble_ceiling.py can average them
        runs = {
            seed: train_and_score(
                cfg.override([f"project.seed={seed}", f"paths.model={work / f'model_seed{seed}'}"]), trace_of
            )
            for seed in args.seeds
        }
        figures["runs"] = runs
        parts = []
        for metric in ("auroc", "accuracy", "sensitivity", "specificity"):
            values = [r["test"][metric]["value"] for r in runs.values()]
            figures[f"test_{metric}_min_mean_max"] = [
                round(min(values), 4),
                round(float(np.mean(values)), 4),
                round(max(values), 4),
            ]
            parts.append(f"{metric} " + " / ".join(f"{v:.4f}" for v in values))
        if cfg.model.tta_views:
            parts.append(
                "auroc of the same networks without test-time views "
                + " / ".join(f"{r['test_auroc_without_tta']:.4f}" for r in runs.values())
            )
        for rule in ("youden", "youden_kernel", "youden+aug", "youden_kernel+aug", "hindsight_best_on_test"):
            parts.append(
                f"accuracy at {rule} "
                + " / ".join(f"{r['threshold_rules'][rule]['test_accuracy']:.4f}" for r in runs.values())
            )
        train_s = [r["train_seconds"] for r in runs.values()]
        figures["summary"] = (
            f"{cfg.model.arch} {size} px, seeds {', '.join(map(str, args.seeds))}: test "
            + "; ".join(parts)
            + f"; train {min(train_s):.0f}-{max(train_s):.0f} s"
        )
    else:
        figures |= train_and_score(cfg, trace_of)
    if args.dataset == "pneumoniamnist":
        figures["medmnist_v2_table_auc_acc"] = MEDMNIST_V2
        figures["targets"] = {"auroc": 0.98, "accuracy": 0.93, "train_seconds": 300}
    write_result(args.name or name, figures)


if __name__ == "__main__":
    main()
