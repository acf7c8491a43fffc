"""Cross-architecture ensembles: trained models combined into one, their weights chosen on validation.

Members may be any architectures trained on the same prepared data at any of its sizes. The ensemble takes the
largest member's input and resizes it for each smaller member inside the network (one preprocessing, carried in
one card). Its weights minimise the validation log loss of the weighted mean logits, scored through that same
path, so what is chosen is what is served; the test split is never read. Then the tail every model goes through:
threshold, out-of-distribution check, card, MLflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import log_expit, log_softmax, softmax

from cxr.data.loader import PreparedData
from cxr.errors import UserError
from cxr.models.predictor import Predictor
from cxr.models.wrappers import Ensemble
from cxr.task import Task
from cxr.tracking import runs as tracking
from cxr.tracking.uris import load_predictor, resolve
from cxr.training.card import check_prepared
from cxr.training.environment import environment, environment_tags
from cxr.training.fit import FitResult, Trained, finish
from cxr.training.scoring import task_auroc

if TYPE_CHECKING:
    from cxr.config import Config


class EnsembleMismatch(UserError):
    """Models that cannot be combined: another task, labels, preprocessing or training data."""


def combine(cfg: "Config", sources: Sequence[str], model_dir: Path | None = None) -> FitResult:
    """Combine the models at ``sources`` (directories or MLflow URIs) into one, saved to ``model_dir``
    (default ``paths.model``) and logged as an MLflow run like a trained model."""
    if len(sources) < 2:
        raise UserError(f"an ensemble needs at least 2 models, got {len(sources)}")
    members = [load_predictor(resolve(cfg, source)[1]) for source in sources]
    size = max(m.spec.size for m in members)
    # the ensemble's input: its card, input example and checks use it (PreparedData refuses a size not prepared)
    cfg = cfg.override({"prepare.sizes": sorted({*cfg.prepare.sizes, size}), "model.image_size": size})
    data = PreparedData(cfg.paths.prepared, size)
    check_prepared(cfg, data)
    check_members(members, list(sources), data)
    ensemble = Ensemble([m.model for m in members], input_sizes=[m.spec.size for m in members], image_size=size)
    val_idx = data.split("val")
    logits = member_logits(ensemble, data, val_idx, cfg.train.batch_size * 2)
    weights = choose_weights(logits, data.targets[val_idx], data.task)
    ensemble.set_weights(weights)
    val_probs = activate(np.tensordot(weights, logits, 1), data.task)
    val_auroc = task_auroc(data.targets[val_idx], val_probs, data.task)
    members_said = member_lineage(members, sources, weights, logits, data.targets[val_idx], data.task)
    trained = Trained(
        model=ensemble,
        device=torch.device("cpu"),
        val_probs=val_probs,
        val_auroc=val_auroc,
        objective=val_auroc,
        best_epoch=0,  # trained before: each member's card holds its own
        history=[],
        images_per_second=0.0,
        metrics=summary(val_auroc, members_said),
        lineage={"members": members_said},
    )
    env = environment(trained.device)
    tags = {**tracking.lineage_tags(data.card), **environment_tags(env)}
    with tracking.run(cfg, name=run_name(members, size), tags=tags) as active:
        run_id = active.info.run_id if active else None
        if active:
            tracking.log_training_inputs(cfg, data)
        trained.lineage |= {"git_commit": tags.get("git_commit"), "environment": env}
        return finish(cfg, data, trained, Path(model_dir or cfg.paths.model), run_id, log_model=active is not None)


def check_members(members: list[Predictor], sources: list[str], data: PreparedData) -> None:
    """Members must answer the same question about the same input, and have been trained on ``data``: validation
    chooses the weights, so a member trained on other splits could have seen those films."""
    first = members[0].card
    for member, source in zip(members[1:], sources[1:]):
        card = member.card
        for what, a, b in [
            ("task", str(first.task), str(card.task)),
            ("labels", first.labels, card.labels),
            ("tabular inputs", first.n_tabular, card.n_tabular),
            ("resize", first.preprocess.resize, card.preprocess.resize),
            ("clip_percentiles", first.preprocess.clip_percentiles, card.preprocess.clip_percentiles),
        ]:
            if a != b:
                raise EnsembleMismatch(f"{source} has {what} {b!r} but {sources[0]} has {a!r}: they cannot be combined")
    for member, source in zip(members, sources):
        if member.card.training.dataset_hash != data.card["dataset_hash"]:
            raise EnsembleMismatch(
                f"{source} was trained on other data (dataset {member.card.training.dataset_hash[:12]}…) than "
                f"{data.root} ({data.card['dataset_hash'][:12]}…): its validation films could be its training films; "
                "retrain it on these prepared data"
            )


@torch.inference_mode()
def member_logits(ensemble: Ensemble, data: PreparedData, index: np.ndarray, batch_size: int) -> np.ndarray:
    """Every member's logits ``(members, films, outputs)`` for ``index``, each member fed as the ensemble feeds it."""
    ensemble.eval()
    out = []
    for x, _, t, _ in data.batches(index, batch_size):
        x = x.contiguous(memory_format=torch.channels_last)
        out.append(ensemble.stacked(x, t if ensemble.n_tabular else None).float())
    return torch.cat(out, dim=1).numpy().astype(np.float64)


def log_loss(logits: np.ndarray, y: np.ndarray, task: Task | str) -> float:
    """Mean negative log-likelihood of targets ``y`` under ``logits`` (films, outputs)."""
    if Task(task).exclusive:
        return float(-log_softmax(logits, axis=1)[np.arange(len(y)), y].mean())
    y = y.reshape(logits.shape)
    return float(-(y * log_expit(logits) + (1 - y) * log_expit(-logits)).mean())


def choose_weights(logits: np.ndarray, y: np.ndarray, task: Task | str) -> np.ndarray:
    """Weights on the simplex (non-negative, summing to one) that minimise the validation log loss of the
    weighted mean of the members' logits ``(members, films, outputs)``: a proper scoring rule, smooth in the
    weights, so a member that adds nothing is weighted down rather than the choice jumping between ties."""
    if len(logits) == 1:
        return np.ones(1)
    found = minimize(
        lambda z: log_loss(np.tensordot(softmax(z), logits, 1), y, task),
        np.zeros(len(logits)),
        method="Nelder-Mead",
        options={"xatol": 1e-4, "fatol": 1e-7, "maxiter": 400 * len(logits)},
    )
    return softmax(found.x)


def activate(logits: np.ndarray, task: Task | str) -> np.ndarray:
    task = Task(task)
    return task.squeeze(task.activate_array(logits))


def member_lineage(
    members: list[Predictor],
    sources: Sequence[str],
    weights: np.ndarray,
    logits: np.ndarray,
    y: np.ndarray,
    task: Task | str,
) -> list[dict[str, Any]]:
    """What the card says of each member: where it came from, its weight, its validation AUROC as fed here."""
    return [
        {
            "arch": m.card.arch,
            "image_size": m.spec.size,
            "source": str(source),
            "run_id": m.card.training.run_id,
            "best_epoch": m.card.training.best_epoch,
            "weights_sha256": m.card.weights_sha256,
            "weight": float(w),
            "val_auroc": task_auroc(y, activate(member, task), task),
        }
        for m, source, w, member in zip(members, sources, weights, logits)
    ]


def summary(val_auroc: float, members: list[dict[str, Any]]) -> dict[str, float]:
    """The run's metrics: the ensemble's validation AUROC, each member's as fed here and its weight."""
    out = {"best_val_auroc": val_auroc}
    for i, member in enumerate(members, 1):
        out |= {f"member{i}/val_auroc": member["val_auroc"], f"member{i}/weight": member["weight"]}
    return out


def run_name(members: list[Predictor], size: int) -> str:
    """What the MLflow UI lists: ``ensemble mlp+simple_cnn 64px``."""
    return f"ensemble {'+'.join(m.card.arch for m in members)} {size}px"
