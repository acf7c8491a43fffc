"""Choose ``train.augment.strength`` and the threshold rule on validation only; read the test split once, at the end.

    python benchmarks/defaults_protocol.py                       # the full protocol (PneumoniaMNIST, 28 px)
    python benchmarks/defaults_protocol.py --seeds 1,2 --epochs 15 --workers 2   # fewer epochs, said in the JSON
    python benchmarks/defaults_protocol.py --train-only          # stage 1's networks only (cached, resumable)

Why: the defaults ``train.augment.strength: 2.0``, ``evaluate.threshold: youden_kernel`` and
``evaluate.threshold_augmented_copies: 10`` were picked by reading PneumoniaMNIST *test* results, and that test
split is the Kermany test set: figures on it for those defaults are optimistic. This script re-chooses them with
rules declared here, before any result is seen, on the official validation split only.

The protocol (PneumoniaMNIST, official train / val / test splits, the default simple CNN at 28 px):

1. **Augmentation strength.** For each candidate in ``STRENGTHS`` and each seed, train the default config with
   that strength on the train split (early stopping and the saved epoch on clean validation AUROC, as the default
   does). Score each network on validation twice: clean, and *shifted*: ``SHIFT_COPIES`` seeded copies of
   validation seen through ``train.augment``'s ranges at each strength in ``SHIFT_STRENGTHS`` (one fixed exam for
   every candidate, so a candidate is not judged on its own augmentation; it spans mild to strong acquisition
   variation). Score = mean over seeds of (clean AUROC + shifted AUROC) / 2: clean validation alone rewards weak
   augmentation (it is cut from the training distribution), shifted alone rewards strong augmentation.
   Choice: the smallest strength whose score is within ``TIE`` of the best (a difference smaller than the
   seed-to-seed spread is not evidence for more augmentation).
2. **Threshold rule.** With the chosen strength's networks, each candidate rule (``RULES`` x
   ``THRESHOLD_COPIES``: the cut-off rule, run on the clean films or on copies seen through the training
   augmentation as ``cxr train`` does) is fitted on one half of validation and measured on the other half, and the
   other way round; halves are stratified and seeded, ``HALVES`` different cuts. Measure = balanced accuracy on the
   held-out half, mean of the clean films and the shifted copies above (balanced accuracy, because the test split's
   prevalence differs from validation's; clean and shifted, as in stage 1). Choice: the best mean over seeds, cuts
   and both directions; within ``TIE`` of the best, the first in the order of ``rule_candidates()`` (fewer copies
   first: cheaper and one assumption fewer). ``|sensitivity - specificity|`` is reported beside it, not used.
   The ``sensitivity`` rule aims at a sensitivity, not at balanced accuracy; it is in the table for completeness.
3. **Test, once.** Only after both choices are written: the chosen defaults' networks (stage 1's, threshold
   from the chosen rule on the whole validation split) and today's defaults' networks (strength 2.0, youden_kernel
   on 10 augmented copies) are scored on the test split: AUROC, accuracy, sensitivity, specificity with bootstrap
   CIs, per seed, reported as they came. Nothing is chosen after this step.

The declared run is seeds 1,2,3 at the config's epochs (30); a machine that cannot afford it may run fewer
epochs or seeds (the JSON records both). With fewer than ``MIN_SEEDS`` seeds, or networks missing, stages 1 and 2
still report what validation says, but the JSON says ``partial: true``, the test split is not read and nothing may
be changed on the strength of it: a complete run reads the test split once, later.

Writes benchmarks/results/defaults_protocol.json; networks are cached under benchmarks/work/defaults_protocol/
(keyed by strength, seed and epochs), so an interrupted run resumes where it stopped (``--no-train`` scores only
what is cached).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold

from common import WORK, pneumoniamnist, work_paths, write_result
from cxr.config import Config, load_config
from cxr.data.ingest import ingest
from cxr.data.loader import PreparedData
from cxr.data.prepare import prepare
from cxr.evaluation.evaluate import score_split
from cxr.evaluation.metrics import binary_metrics, choose_threshold
from cxr.models.predictor import Predictor
from cxr.training.fit import fit
from cxr.training.scoring import augmented_scores, predict_split, task_auroc
from cxr.training.threshold import choose_thresholds, threshold_scores

STRENGTHS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)  # 4 and 5 added after 3, the largest first tried, won
SHIFT_STRENGTHS = (1.0, 2.0, 3.0)
SHIFT_COPIES = 4  # per shift strength
SHIFT_SEED = 12345  # the shifted copies: the same films for every candidate
RULES = ("youden_kernel", "youden", "sensitivity")
THRESHOLD_COPIES = (0, 10)
HALVES = 5
TIE = 0.002
MIN_SEEDS = 2  # fewer: the figures are partial and the test split is not read
TODAY = {
    "train.augment.strength": 2.0,
    "evaluate.threshold": "youden_kernel",
    "evaluate.threshold_augmented_copies": 10,
}
REPORTED = ("auroc", "accuracy", "balanced_accuracy", "sensitivity", "specificity")
WORKDIR = WORK / "defaults_protocol"


def base_config(epochs: int | None) -> Config:
    """The default config on PneumoniaMNIST at 28 px, everything written under WORKDIR, no MLflow."""
    overrides = {**pneumoniamnist(28), **work_paths(WORKDIR), "mlflow.enabled": False}
    if epochs:
        overrides["train.epochs"] = epochs
    return load_config(overrides=overrides)


def model_dir(strength: float, seed: int) -> Path:
    return WORKDIR / f"strength{strength:g}_seed{seed}"


def prepare_once(cfg: Config) -> None:
    if not (Path(cfg.paths.prepared) / "card.json").exists():
        ingest(cfg)
        prepare(cfg)


def train_one(job: tuple[float, int, int | None, int]) -> dict:
    """Train one (strength, seed) network unless it is cached; its training facts (a worker process's job)."""
    strength, seed, epochs, threads = job
    import torch

    torch.set_num_threads(threads)
    out = model_dir(strength, seed)
    facts = out.with_suffix(".json")
    cfg = base_config(epochs).override({"train.augment.strength": strength, "project.seed": seed})
    if facts.exists() and (out / "model.json").exists():
        cached = json.loads(facts.read_text())
        if cached["epochs"] == cfg.train.epochs:
            return cached
    t0 = time.perf_counter()
    result = fit(cfg, model_dir=out, log_model=False)
    row = {
        "strength": strength,
        "seed": seed,
        "epochs": cfg.train.epochs,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "epochs_trained": result.epochs_trained,
        "best_epoch": result.best_epoch,
    }
    facts.write_text(json.dumps(row))
    return row


def train_all(strengths, seeds, epochs, workers: int) -> list[dict]:
    threads = max(1, (os.cpu_count() or 1) // workers)
    jobs = [(s, seed, epochs, threads) for seed in seeds for s in strengths]  # every strength's first seed first
    if workers == 1:
        return [train_one(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(train_one, jobs))


# --- stage 1: strength ------------------------------------------------------------------------------------------


class Scored:
    """One network's validation scores: clean (n,), shifted (SHIFT_STRENGTHS x SHIFT_COPIES rows, n)."""

    def __init__(self, cfg: Config, data: PreparedData, strength: float, seed: int) -> None:
        import torch

        self.strength, self.seed = strength, seed
        self.model = Predictor.from_dir(model_dir(strength, seed)).model
        self.val = data.split("val")
        self.y = data.targets[self.val]
        cache = model_dir(strength, seed).with_suffix(".scores.npz")  # keyed by the exam that made them
        exam = np.array([SHIFT_SEED, SHIFT_COPIES, *SHIFT_STRENGTHS], dtype=float)
        cached = dict(np.load(cache)) if cache.exists() else {}
        if np.array_equal(cached.get("exam"), exam):
            self.clean, self.shifted = cached["clean"], cached["shifted"]
            return
        cpu = torch.device("cpu")
        self.clean = predict_split(self.model, data, self.val, 256, cpu, data.task, "fp32")
        rows = []
        for s in SHIFT_STRENGTHS:
            aug = cfg.train.augment.model_copy(update={"strength": s})
            _, p = augmented_scores(self.model, data, self.val, aug, SHIFT_COPIES, SHIFT_SEED, 256, cpu, "fp32")
            rows.append(p.reshape(SHIFT_COPIES, -1))
        self.shifted = np.concatenate(rows)
        np.savez(cache, exam=exam, clean=self.clean, shifted=self.shifted)

    def figures(self) -> dict:
        per = [task_auroc(np.tile(self.y, SHIFT_COPIES), self.shifted[i * SHIFT_COPIES : (i + 1) * SHIFT_COPIES].ravel(), "binary")
               for i in range(len(SHIFT_STRENGTHS))]  # fmt: skip
        clean = task_auroc(self.y, self.clean, "binary")
        shifted = float(np.mean(per))
        return {
            "seed": self.seed,
            "val_auroc_clean": round(clean, 4),
            "val_auroc_shifted": round(shifted, 4),
            "val_auroc_shifted_by_strength": {f"{s:g}": round(a, 4) for s, a in zip(SHIFT_STRENGTHS, per)},
            "score": round((clean + shifted) / 2, 4),
        }


def first_within_tie(scores: dict, order: list) -> tuple:
    """The first key in ``order`` whose score is within TIE of the best."""
    best = max(scores.values())
    return next(k for k in order if scores[k] >= best - TIE)


def choose_strength(scored: dict[float, list[Scored]]) -> tuple[float, dict]:
    table = {}
    for strength, nets in scored.items():
        rows = [n.figures() for n in nets]
        table[f"{strength:g}"] = {"score_mean": round(float(np.mean([r["score"] for r in rows])), 4), "seeds": rows}
    means = {s: table[f"{s:g}"]["score_mean"] for s in scored}
    return first_within_tie(means, sorted(means)), table


# --- stage 2: threshold rule ------------------------------------------------------------------------------------


def rule_candidates(strength: float) -> list[tuple[str, int]]:
    copies = THRESHOLD_COPIES if strength > 0 else (0,)  # no augmentation: every copy is the clean film
    return [(rule, k) for k in sorted(copies) for rule in RULES]


def held_out(y: np.ndarray, scores: np.ndarray, t: float) -> tuple[float, float]:
    """Balanced accuracy and |sensitivity - specificity| at threshold t."""
    pred = scores >= t
    sens, spec = pred[y == 1].mean(), 1 - pred[y == 0].mean()
    return float(balanced_accuracy_score(y, pred)), float(abs(sens - spec))


def rule_trials(cfg: Config, data: PreparedData, net: Scored, candidates: list[tuple[str, int]]) -> dict:
    """Every candidate rule fitted on one half of validation, measured on the other, over HALVES cuts."""
    import torch

    k_max = max(k for _, k in candidates)
    aug = None
    if k_max:
        c = cfg.override({"project.seed": net.seed, "evaluate.threshold_augmented_copies": k_max})
        _, p = threshold_scores(net.model, data, net.val, net.clean, c, torch.device("cpu"))
        aug = p.reshape(k_max, -1)  # copy-major, as cxr train draws them
    out: dict[str, list] = {f"{r}+{k}": [] for r, k in candidates}
    y = net.y
    for cut in range(HALVES):
        halves = [b for _, b in StratifiedKFold(2, shuffle=True, random_state=cut).split(y, y)]
        for fit_on, test_on in (halves, halves[::-1]):
            for rule, k in candidates:
                scores = net.clean[fit_on] if k == 0 else aug[:k, fit_on].ravel()
                t = choose_threshold(np.tile(y[fit_on], max(k, 1)), scores, rule, cfg.evaluate.target_sensitivity)
                n_shift = net.shifted.shape[0]
                clean = held_out(y[test_on], net.clean[test_on], t)
                shifted = held_out(np.tile(y[test_on], n_shift), net.shifted[:, test_on].ravel(), t)
                out[f"{rule}+{k}"].append(
                    [(clean[0] + shifted[0]) / 2, clean[0], shifted[0], (clean[1] + shifted[1]) / 2]
                )
    return out


def choose_rule(cfg: Config, data: PreparedData, nets: list[Scored]) -> tuple[tuple[str, int], dict]:
    candidates = rule_candidates(nets[0].strength)
    trials = [rule_trials(cfg, data, net, candidates) for net in nets]
    table = {}
    for name in trials[0]:
        a = np.array([row for t in trials for row in t[name]])
        table[name] = {
            "balanced_accuracy_mean": round(float(a[:, 0].mean()), 4),
            "balanced_accuracy_clean": round(float(a[:, 1].mean()), 4),
            "balanced_accuracy_shifted": round(float(a[:, 2].mean()), 4),
            "abs_sens_minus_spec": round(float(a[:, 3].mean()), 4),
            "balanced_accuracy_per_seed": [round(float(np.mean([r[0] for r in t[name]])), 4) for t in trials],
        }
    means = {name: table[name]["balanced_accuracy_mean"] for name in table}
    name = first_within_tie(means, [f"{r}+{k}" for r, k in candidates])
    rule, k = name.rsplit("+", 1)
    return (rule, int(k)), table


# --- stage 3: test, once ----------------------------------------------------------------------------------------


def test_figures(cfg: Config, data: PreparedData, setting: dict, seeds) -> dict:
    """Each seed's network at ``setting``: its threshold chosen as ``cxr train`` would, then the test split."""
    import torch

    runs = {}
    for seed in seeds:
        c = cfg.override({**setting, "project.seed": seed})
        predictor = Predictor.from_dir(model_dir(c.train.augment.strength, seed))
        val = data.split("val")
        y_val, p_val = threshold_scores(predictor.model, data, val, None, c, torch.device("cpu"))
        predictor.threshold = choose_thresholds(data.task, y_val, p_val, c)
        _, y, p = score_split(predictor, data, "test")
        m = binary_metrics(y, p, predictor.threshold, n_bootstrap=c.evaluate.bootstrap, ci=c.evaluate.ci, seed=seed)
        rounded = {k: {name: round(v, 4) for name, v in m[k].items()} for k in REPORTED}
        runs[str(seed)] = {"threshold": round(predictor.threshold, 4), **rounded}
    means = {k: round(float(np.mean([r[k]["value"] for r in runs.values()])), 4) for k in REPORTED}
    return {"setting": setting, "runs": runs, "mean_over_seeds": means, "n": int(len(y)), "n_pos": int(y.sum())}


# --- the protocol -----------------------------------------------------------------------------------------------


def trained(strength: float, seed: int, epochs: int) -> bool:
    facts = model_dir(strength, seed).with_suffix(".json")
    return facts.exists() and json.loads(facts.read_text())["epochs"] == epochs


def available(strengths, seeds, epochs: int) -> dict[float, list[int]]:
    return {s: [seed for seed in seeds if trained(s, seed, epochs)] for s in strengths}


def run_protocol(cfg: Config, strengths, seeds, train_rows: list[dict]) -> dict:
    """Stages 1 and 2 on what is trained; stage 3 (the test split) only when the declared protocol is complete:
    every network trained, at least MIN_SEEDS seeds. Otherwise the figures are marked partial, the test split
    stays unread, and no choice is final."""
    data = PreparedData(cfg.paths.prepared, cfg.model.image_size)
    have = available(strengths, seeds, cfg.train.epochs)
    missing = {f"{s:g}": [x for x in seeds if x not in got] for s, got in have.items() if len(got) < len(seeds)}
    partial = bool(missing) or len(seeds) < MIN_SEEDS
    scored = {s: [Scored(cfg, data, s, seed) for seed in got] for s, got in have.items() if got}
    strength, strength_table = choose_strength(scored)
    (rule, copies), rule_table = choose_rule(cfg, data, scored[strength])
    chosen = {
        "train.augment.strength": strength,
        "evaluate.threshold": rule,
        "evaluate.threshold_augmented_copies": copies,
    }
    figures: dict = {
        "partial": partial,
        "missing_networks": missing,
        "candidates": {
            "train.augment.strength": list(strengths),
            "evaluate.threshold": list(RULES),
            "evaluate.threshold_augmented_copies": list(THRESHOLD_COPIES),
        },  # fmt: skip
        "seeds": list(seeds),
        "min_seeds": MIN_SEEDS,
        "epochs": cfg.train.epochs,
        "shift": {"strengths": list(SHIFT_STRENGTHS), "copies_each": SHIFT_COPIES, "seed": SHIFT_SEED},
        "halves": HALVES,
        "tie": TIE,
        "training": train_rows,
        "stage1_strength_validation": strength_table,
        "stage2_rule_validation": rule_table,
        "chosen_on_validation": chosen,
        "differs_from_today": chosen != TODAY,
        "today": TODAY,
    }
    if not partial:  # a choice from part of the protocol is not final: the test split stays unread for a full run
        figures["stage3_test_chosen"] = test_figures(cfg, data, chosen, seeds)
        figures["stage3_test_today"] = test_figures(cfg, data, TODAY, seeds)
    figures["summary"] = summary(figures)
    return figures


def summary(f: dict) -> str:
    """One line for the benchmarks table."""
    scores = ", ".join(f"{s} {t['score_mean']:.4f}" for s, t in f["stage1_strength_validation"].items())
    c = f["chosen_on_validation"]
    rule = f"{c['evaluate.threshold']} on {c['evaluate.threshold_augmented_copies']} copies"
    rule_ba = f["stage2_rule_validation"][f"{c['evaluate.threshold']}+{c['evaluate.threshold_augmented_copies']}"]
    head = f"seeds {','.join(map(str, f['seeds']))}, {f['epochs']} epochs: "
    picked = (f"validation score by strength {scores} -> strength {c['train.augment.strength']:g}; "
              f"rule {rule} (held-out balanced accuracy {rule_ba['balanced_accuracy_mean']:.4f})")  # fmt: skip
    if f["partial"]:
        return "PARTIAL, test split not read, nothing adopted: " + head + picked
    chosen, today = (f[k]["mean_over_seeds"] for k in ("stage3_test_chosen", "stage3_test_today"))
    test = "; ".join(
        f"{name} test AUROC {m['auroc']:.4f}, accuracy {m['accuracy']:.4f}, sens {m['sensitivity']:.3f}, "
        f"spec {m['specificity']:.3f}"
        for name, m in (("chosen", chosen), ("today's", today))
    )
    return head + picked + "; " + test


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    number_list = lambda kind: lambda v: [kind(x) for x in v.split(",")]  # noqa: E731
    ap.add_argument("--strengths", type=number_list(float), default=list(STRENGTHS))
    ap.add_argument("--seeds", type=number_list(int), default=[1, 2, 3])
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the config's)")
    ap.add_argument("--workers", type=int, default=1, help="networks trained at once (one process each)")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--no-train", action="store_true", help="use the cached networks only (partial if some lack)")
    args = ap.parse_args()
    os.environ.setdefault("CXR_NO_PROGRESS", "1")
    t0 = time.perf_counter()
    cfg = base_config(args.epochs)
    prepare_once(cfg)
    rows = [] if args.no_train else train_all(args.strengths, args.seeds, args.epochs, args.workers)
    if args.train_only:
        return
    if args.no_train:
        rows = [json.loads(p.read_text()) for p in sorted(WORKDIR.glob("strength*_seed*.json"))]
    figures = run_protocol(cfg, args.strengths, args.seeds, rows)
    figures["wall_seconds"] = round(time.perf_counter() - t0, 1)  # scoring only with --no-train
    figures["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    write_result("defaults_protocol", figures)


if __name__ == "__main__":
    main()
