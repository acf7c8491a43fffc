"""Which out-of-distribution score tells a Kermany-trained model's own films from adult films of other hospitals?

    python benchmarks/ood.py            # trains the Kermany default (64 px, ~10 min on 2 cores), then scores
    python benchmarks/ood.py --reuse    # the model trained by an earlier run

The model: the default config on ../shared/data/kermany224 (children's films; patient-level val and test split cut
by prepare), with real films' augmentation strength. It is the population the issue reported: served, it ranked
adult films worse than chance and warned on 8 %.

Candidates (each a score where higher is further from the training films), every one with its threshold set on
the Kermany validation split so that 95 % of those films pass (``ood.val_pass_rate``):

- ``intensity``: the largest |z| of a film's grey-level mean and std against the training films' (the service's
  earlier check);
- ``max_probability``: 0.5 minus the distance of the probability from 0.5 (an unsure answer scores high);
- ``knn_penultimate``: cosine distance to the 10th nearest training film in the pooled last feature map;
- ``mahalanobis_penultimate``: class-conditional Mahalanobis distance of the pooled last feature map;
- ``feature_mahalanobis``: the model's own check (cxr.models.ood): means and standard deviations of every
  stage's channels, summed log Mahalanobis distances.

The rule, declared before any result: ``../shared/data/adult_cxr`` is cut by patient into two halves (seeded).
On the first ("choose") half, the method flagging the largest share at its validation threshold wins; within two
points, the higher AUROC of validation vs that half. The second ("report") half, the whole set, its lateral films,
random noise and a non-chest DICOM are reported for the chosen method, and the Kermany test split's flagged share
is read once, at the end (the target: at most 10 % of it, at least 80 % of the adult films and of the laterals).
"""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from common import WORK, require_shared, work_paths, write_result
from cxr.config import REAL_FILMS_AUGMENT_STRENGTH, load_config
from cxr.data.ingest import ingest
from cxr.data.loader import PreparedData
from cxr.data.prepare import prepare
from cxr.models.ood import FeatureTap, OodDetector
from cxr.models.predictor import Predictor
from cxr.training.fit import fit
from cxr.training.ood import class_index

PASS_RATE = 0.95
K = 10
TIE = 0.02
SEED = 0
NON_CHEST = "wg04_RG3_J2KI_NONCHEST_extremity_jpeg2000.dcm"


def train(work) -> Predictor:
    cfg = load_config(overrides={
        "data.source": "kermany", "data.path": str(require_shared("kermany224")), "data.copy_images": False,
        "train.augment.strength": REAL_FILMS_AUGMENT_STRENGTH, "mlflow.enabled": False, **work_paths(work),
    })  # fmt: skip
    if not (work / "model" / "model.json").exists():
        ingest(cfg)
        prepare(cfg)
        fit(cfg)
    return Predictor.from_dir(work / "model")


def adult_films(predictor: Predictor) -> tuple[np.ndarray, pd.DataFrame]:
    """The adult films through the served model's own reader and preprocessing; the label table."""
    root = require_shared("adult_cxr")
    table = pd.read_csv(root / "labels.csv")
    images = np.stack([predictor.prepare_input(predictor.read(root / p)) for p in table["path"]])
    patients = table["patient_id"].astype(str).unique()
    chosen = set(np.random.default_rng(SEED).permutation(patients)[: len(patients) // 2])
    table["half"] = ["choose" if p in chosen else "report" for p in table["patient_id"].astype(str)]
    return images, table


@torch.inference_mode()
def features(predictor: Predictor, images: np.ndarray) -> dict[str, np.ndarray]:
    """Per film: probability, grey-level mean/std, every stage's summaries (the tap the check uses)."""
    stages = predictor.card.ood.stages
    with FeatureTap(predictor.model, stages) as tap:
        probs = predictor.predict_proba(images)
    summaries = tap.take()
    grey = images.reshape(len(images), -1).astype(np.float32) / 255.0
    return {"prob": probs, "mean": grey.mean(1), "std": grey.std(1), "summaries": summaries}


def scorers(predictor: Predictor, train: dict, labels: np.ndarray):
    """name -> function(features) -> scores, each fitted on the training films only."""
    moments = {k: (train[k].mean(), train[k].std()) for k in ("mean", "std")}
    last_mean = train["summaries"][-2]  # the last stage's channel means: the pooled penultimate features
    bank = last_mean / np.linalg.norm(last_mean, axis=1, keepdims=True)
    penultimate = OodDetector.fitted([last_mean], labels)

    def knn(f: dict) -> np.ndarray:
        x = f["summaries"][-2] / np.linalg.norm(f["summaries"][-2], axis=1, keepdims=True)
        return np.sort(1 - x @ bank.T, axis=1)[:, K - 1]

    return {
        "intensity": lambda f: np.max([np.abs(f[k] - m) / s for k, (m, s) in moments.items()], axis=0),
        "max_probability": lambda f: 0.5 - np.abs(f["prob"] - 0.5),
        "knn_penultimate": knn,
        "mahalanobis_penultimate": lambda f: penultimate.score([f["summaries"][-2]]),
        "feature_mahalanobis": lambda f: predictor.ood.score(f["summaries"]),
    }


def flagged(scores: np.ndarray, threshold: float) -> float:
    return round(float(np.mean(scores > threshold)), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reuse", action="store_true", help="score the model an earlier run trained")
    args = ap.parse_args()
    work = WORK / "ood"
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
    predictor = train(work)
    data = PreparedData(work / "prepared", predictor.spec.size)
    train_idx = data.split("train")
    sample = train_idx if len(train_idx) <= 10000 else np.random.default_rng(SEED).choice(train_idx, 10000, False)
    feats = {"train": features(predictor, data.images[np.sort(sample)]),
             "val": features(predictor, data.images[data.split("val")])}  # fmt: skip
    adult, table = adult_films(predictor)
    feats["adult"] = features(predictor, adult)
    noise = np.random.default_rng(SEED).integers(0, 256, (100, *adult.shape[1:]), dtype=np.uint8)
    feats["noise"] = features(predictor, noise)
    tibia = require_shared("dicom", NON_CHEST)
    feats["non_chest"] = features(predictor, predictor.prepare_input(predictor.read(tibia))[None])
    methods = scorers(predictor, feats["train"], class_index(data, np.sort(sample)))
    choose = (table["half"] == "choose").to_numpy()
    lateral = (table["frontal"] == 0).to_numpy()
    rows = {}
    for name, score in methods.items():
        val, ad = score(feats["val"]), score(feats["adult"])
        t = float(np.quantile(val, PASS_RATE))
        y = np.r_[np.zeros(len(val)), np.ones(choose.sum())]
        rows[name] = {
            "threshold": t,
            "auroc_val_vs_adult_choose": round(float(roc_auc_score(y, np.r_[val, ad[choose]])), 4),
            "adult_choose_flagged": flagged(ad[choose], t),
        }
    best = max(r["adult_choose_flagged"] for r in rows.values())
    near = {n: r for n, r in rows.items() if r["adult_choose_flagged"] >= best - TIE}
    chosen = max(near, key=lambda n: near[n]["auroc_val_vs_adult_choose"])
    score, t = methods[chosen], rows[chosen]["threshold"]
    ad = score(feats["adult"])
    report = {
        "adult_report_half_flagged": flagged(ad[~choose], t),
        "adult_all_flagged": flagged(ad, t),
        "adult_lateral_flagged": flagged(ad[lateral], t),
        "adult_frontal_flagged": flagged(ad[~lateral], t),
        "adult_films": int(len(ad)),
        "adult_lateral_films": int(lateral.sum()),
        "noise_flagged": flagged(score(feats["noise"]), t),
        "non_chest_dicom_flagged": flagged(score(feats["non_chest"]), t),
    }
    for name, r in rows.items():  # the same figures for every candidate, for the record (chosen already)
        r.update(adult_all_flagged=flagged(methods[name](feats["adult"]), r["threshold"]),
                 adult_lateral_flagged=flagged(methods[name](feats["adult"])[lateral], r["threshold"]))  # fmt: skip
    test = features(predictor, data.images[data.split("test")])  # read once, after the choice
    report["kermany_test_flagged"] = flagged(score(test), t)
    shipped = predictor.card.ood
    write_result("ood", {
        "summary": f"chosen {chosen} (adult films flagged on the choosing half: "
        + ", ".join(f"{n} {r['adult_choose_flagged']:.3f}" for n, r in rows.items())
        + f"); at {PASS_RATE:.0%} of Kermany validation passing it flags {report['kermany_test_flagged']:.1%} of the "
        f"Kermany test split, {report['adult_all_flagged']:.1%} of {report['adult_films']} adult films, "
        f"{report['adult_lateral_flagged']:.1%} of the {report['adult_lateral_films']} laterals, "
        f"{report['noise_flagged']:.0%} of noise, the tibia: {report['non_chest_dicom_flagged']:.0%}",
        "candidates": rows,
        "chosen": chosen,
        "chosen_figures": report,
        "shipped_check": json.loads(shipped.model_dump_json(exclude={"stages", "dims"})),
        "rule": f"highest share of the adult 'choose' half flagged at the {PASS_RATE:.0%} validation pass threshold; "
        f"within {TIE}, the higher AUROC (validation vs that half); test read once, after",
    })  # fmt: skip


if __name__ == "__main__":
    main()
