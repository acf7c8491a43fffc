"""fit(cfg, callbacks): the one training function behind `cxr train`, DVC's train stage and `cxr tune`.

Trains on the prepared arrays (networks through :func:`cxr.training.loop.train_network`, the logistic-regression
baselines through :func:`cxr.training.baseline.fit_baseline`), then every model goes through the same tail: the
threshold chosen on validation, the model card written from the prepared data's card, the model saved and logged
to MLflow. ``train.ensemble`` > 1 trains that many seeded networks and saves them as one averaging model.
Launched by torchrun, every process trains its shard of each batch and rank 0 alone does the tail
(:mod:`cxr.training.distributed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import torch

from cxr.data.augment import draw_augment
from cxr.data.loader import PreparedData
from cxr.errors import UserError
from cxr.models.networks import check_input_size
from cxr.models.predictor import Predictor
from cxr.models.wrappers import Ensemble, TestTimeAugmentation
from cxr.tracking import runs as tracking
from cxr.training import distributed
from cxr.training.baseline import BASELINE_ARCHS, fit_baseline
from cxr.training.callbacks import Callback, EarlyStopping, MlflowMetrics, ScoreYardstick, Timer
from cxr.training.card import check_prepared, model_card
from cxr.training.distributed import Ranks
from cxr.training.environment import environment, environment_tags
from cxr.training.freeze import check_freeze
from cxr.training.loop import Member, train_network
from cxr.training.ood import fit_ood
from cxr.training.scoring import Yardstick, predict_split, task_auroc, uses_bf16
from cxr.training.setup import resolve_device
from cxr.training.threshold import choose_thresholds, threshold_scores

if TYPE_CHECKING:
    from cxr.config import Config


@dataclass
class FitResult:
    model_dir: Path
    run_id: str | None
    best_epoch: int | list[int]  # a list for an ensemble: each member's
    best_val_auroc: float
    epochs_trained: int
    images_per_second: float
    history: list[dict[str, float]] = field(default_factory=list)
    threshold: Any = None
    objective: float | None = None  # a tuning trial's value: the yardstick's AUROC (best_val_auroc without one)
    main_process: bool = True  # False on a data-parallel rank other than 0, which saved and logged nothing


@dataclass
class Trained:
    """A fitted model before the shared tail: what is saved and what its training reached."""

    model: torch.nn.Module
    device: torch.device
    val_probs: np.ndarray | None  # fp32 validation scores of ``model``; None: the tail scores them when needed
    val_auroc: float
    objective: float
    best_epoch: int | list[int]
    history: list[dict[str, float]]
    images_per_second: float
    metrics: dict[str, float]  # the run's summary metrics
    lineage: dict[str, Any] = field(default_factory=dict)  # extra model-card lineage (members, commit, environment)


def fit(
    cfg: "Config",
    callbacks: Sequence[Callback] = (),
    *,
    model_dir: Path | None = None,
    log_model: bool = True,
    extra_tags: dict[str, str] | None = None,
    run_id: str | None = None,
    yardstick: Yardstick | None = None,
) -> FitResult:
    """Train, choose the threshold, save and log the model. ``callbacks`` see every epoch of every network
    (pruning, diagnostics, interruption); ``run_id`` continues an existing MLflow run (a tuning trial's);
    ``yardstick`` is what that trial is judged on (see :class:`~cxr.training.scoring.Yardstick`)."""
    if cfg.model.arch in BASELINE_ARCHS:  # fitted without augmentation: no trained-for variation to choose under
        cfg = cfg.override({"evaluate.threshold_augmented_copies": 0})
    ranks = distributed.ranks_from_env()
    distributed.check_batch_size(cfg.train.batch_size, ranks)
    data, device, model_dir = load_training_data(cfg), training_device(cfg, ranks), Path(model_dir or cfg.paths.model)
    with distributed.process_group(ranks, device):
        if not ranks.is_main:
            return follow_rank0(cfg, data, device, ranks, model_dir)
        env = environment(device)
        tags = {**tracking.lineage_tags(data.card), **environment_tags(env), **(extra_tags or {})}
        with tracking.run(cfg, name=training_run_name(cfg), tags=tags, run_id=run_id) as active:
            run_id = active.info.run_id if active else None
            if active:
                tracking.log_training_inputs(cfg, data)
            if cfg.model.arch in BASELINE_ARCHS:
                linear = fit_baseline(cfg, data)
                trained = Trained(
                    model=linear.model,
                    device=device,
                    val_probs=linear.val_probs,
                    val_auroc=linear.val_auroc,
                    objective=linear.val_auroc,
                    best_epoch=1,
                    history=[{"val_auroc": linear.val_auroc}],
                    images_per_second=linear.images_per_second,
                    metrics=linear.metrics,
                )
            else:
                trained = fit_networks(cfg, data, list(callbacks), yardstick, active is not None, device, ranks)
            trained.lineage = {**trained.lineage, "git_commit": tags.get("git_commit"), "environment": env}
            result = finish(cfg, data, trained, model_dir, run_id, log_model=log_model and active is not None)
        distributed.wait_for_rank0(ranks)  # the others wait here until the model is saved and logged
        return result


def training_run_name(cfg: "Config") -> str:
    """What the MLflow UI lists: ``train simple_cnn 64px``, ``train 3x resnet18 224px`` for an ensemble."""
    ensemble = f"{cfg.train.ensemble}x " if cfg.train.ensemble > 1 and cfg.model.arch not in BASELINE_ARCHS else ""
    return f"train {ensemble}{cfg.model.arch} {cfg.model.image_size}px"


def load_training_data(cfg: "Config") -> PreparedData:
    if cfg.model.arch not in BASELINE_ARCHS:  # before any run starts: the arch takes this input side and freeze
        check_input_size(cfg.model.arch, cfg.model.image_size)
        check_freeze(cfg.model.arch, cfg.model.freeze)
    data = PreparedData(cfg.paths.prepared, cfg.model.image_size)
    check_prepared(cfg, data)
    n_train, n_val = len(data.split("train")), len(data.split("val"))
    if n_train == 0 or n_val == 0:
        raise UserError(f"the prepared data needs train and val images (train={n_train}, val={n_val})")
    return data


def training_device(cfg: "Config", ranks: Ranks) -> torch.device:
    """The baseline fits on the CPU; a network on ``train.device``, one GPU per process when data-parallel."""
    if cfg.model.arch in BASELINE_ARCHS:
        return torch.device("cpu")
    return distributed.rank_device(resolve_device(cfg.train.device), ranks)


def follow_rank0(cfg: "Config", data: PreparedData, device: torch.device, ranks: Ranks, model_dir: Path) -> FitResult:
    """A data-parallel rank other than 0: trains its shard of every network in step with rank 0, then waits
    while rank 0 chooses the threshold, saves and logs. It writes nothing."""
    n = cfg.train.ensemble
    with distributed.quiet_unless_main(ranks):
        for i in range(n if cfg.model.arch not in BASELINE_ARCHS else 0):
            train_network(cfg, data, cfg.project.seed + i, device, [], member=(i + 1, n), ranks=ranks)
    distributed.wait_for_rank0(ranks)
    return FitResult(
        model_dir=model_dir,
        run_id=None,
        best_epoch=0,
        best_val_auroc=float("nan"),
        epochs_trained=0,
        images_per_second=0.0,
        main_process=False,
    )


def fit_networks(
    cfg: "Config",
    data: PreparedData,
    callbacks: list[Callback],
    yardstick: Yardstick | None,
    tracked: bool,
    device: torch.device,
    ranks: Ranks = distributed.SINGLE,
) -> Trained:
    """``train.ensemble`` networks (seeds seed, seed+1, ...), saved as one model (see :func:`saved_model`)."""
    if yardstick is None and cfg.train.early_stopping.monitor == "augmented_val_auroc":
        yardstick = Yardstick.from_config(cfg)  # a tuning trial's comes from the study's config instead
    timer = Timer(device)
    scoring = [ScoreYardstick(yardstick, data, device, cfg.train.precision)] if yardstick else []
    logging = [MlflowMetrics()] if tracked else []
    every = [timer, *scoring, *logging, *callbacks, EarlyStopping(cfg.train.early_stopping.patience)]
    n, members = cfg.train.ensemble, []
    for i in range(n):
        step0 = sum(len(m.history) for m in members)
        members.append(
            train_network(cfg, data, cfg.project.seed + i, device, every, member=(i + 1, n), step0=step0, ranks=ranks)
        )
    model, val_idx = saved_model(cfg, [m.model for m in members]), data.split("val")
    if model is members[0].model:  # the network itself, as its best epoch scored it
        val_auroc, objective = members[0].best_val_auroc, members[0].best_objective
        # the epoch's validation scores, unless they were bf16 (threshold_scores re-scores when it needs them)
        val_probs = None if uses_bf16(device, cfg.train.precision) else members[0].val_probs
    else:  # an ensemble or test-time views: score validation as the saved model will be used
        val_probs = predict_split(model, data, val_idx, cfg.train.batch_size * 2, device, data.task, "fp32")
        val_auroc = task_auroc(data.targets[val_idx], val_probs, data.task)
        objective = yardstick.auroc(model, data, val_idx, device, cfg.train.precision) if yardstick else val_auroc
    history = [row for m in members for row in m.history]
    best_epoch = members[0].best_epoch if n == 1 else [m.best_epoch for m in members]
    return Trained(
        model=model,
        device=device,
        val_probs=val_probs,
        val_auroc=val_auroc,
        objective=objective,
        best_epoch=best_epoch,
        history=history,
        images_per_second=timer.images_per_second,
        metrics=_summary(val_auroc, objective if yardstick else None, history, timer, members),
        lineage={"members": _members(members)} if n > 1 else {},
    )


def _summary(val_auroc: float, augmented: float | None, history: list, timer: Timer, members: list[Member]) -> dict:
    out = {
        "best_val_auroc": val_auroc,
        "epochs_trained": len(history),
        "train_images_per_second_mean": timer.images_per_second,
    }
    if augmented is not None:
        out["best_val_auroc_augmented"] = augmented
    if len(members) == 1:
        return {**out, "best_epoch": members[0].best_epoch}
    return {**out, **{f"member{i + 1}/best_val_auroc": m.best_val_auroc for i, m in enumerate(members)}}


def _members(members: list[Member]) -> list[dict[str, Any]]:
    return [{"seed": m.seed, "best_epoch": m.best_epoch, "val_auroc": m.best_val_auroc} for m in members]


def saved_model(cfg: "Config", networks: list[torch.nn.Module]) -> torch.nn.Module:
    """What is saved: the network, or an :class:`~cxr.models.wrappers.Ensemble` of them, averaged over
    ``model.tta_views`` fixed views drawn from ``train.augment`` at ``model.tta_strength`` when that is > 0."""
    model = networks[0] if len(networks) == 1 else Ensemble(networks)
    k = cfg.model.tta_views
    if k == 0:
        return model
    views_of = cfg.train.augment.model_copy(update={"strength": cfg.model.tta_strength})
    views = draw_augment(k, views_of, torch.Generator().manual_seed(cfg.project.seed))
    return TestTimeAugmentation(model, views).to(next(model.parameters()).device)


def finish(
    cfg: "Config", data: PreparedData, trained: Trained, model_dir: Path, run_id: str | None, *, log_model: bool
) -> FitResult:
    """The tail every model goes through: threshold and out-of-distribution check on validation, model card,
    saved model, MLflow."""
    val_idx = data.split("val")
    scores = threshold_scores(trained.model, data, val_idx, trained.val_probs, cfg, trained.device)
    threshold = choose_thresholds(data.task, *scores, cfg)
    detector, check = fit_ood(trained.model, data, cfg, trained.device) or (None, None)
    card = model_card(
        cfg,
        data,
        trained.model.spec,
        threshold,
        check,
        run_id=run_id,
        best_epoch=trained.best_epoch,
        val_auroc=trained.val_auroc,
        epochs_trained=len(trained.history),
        **trained.lineage,
    )
    Predictor(trained.model.cpu().float(), card, ood=detector).save(model_dir)
    if run_id is not None:
        ood_metrics = {"ood_threshold": check.threshold, "ood_val_pass_rate": check.val_pass_rate} if check else {}
        mlflow.log_metrics({**trained.metrics, **ood_metrics})
        if log_model:
            tracking.log_cxr_model(model_dir, tracking.example_batch(cfg.model.image_size))
    return FitResult(
        model_dir=model_dir,
        run_id=run_id,
        best_epoch=trained.best_epoch,
        best_val_auroc=trained.val_auroc,
        epochs_trained=len(trained.history),
        images_per_second=trained.images_per_second,
        history=trained.history,
        threshold=threshold,
        objective=trained.objective,
    )
