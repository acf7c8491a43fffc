"""fit(cfg, trial=None): the one training function behind `cxr train`, DVC's train stage and `cxr tune`.

Trains on the prepared arrays, early-stops on validation AUROC keeping the best epoch, chooses the
decision threshold on validation (seen through the training augmentation), writes a self-contained model
directory and tracks everything in MLflow. ``train.ensemble`` > 1 trains that many seeded networks and
saves them as one averaging model. With an Optuna trial it reports the trial's objective (validation AUROC,
or a :class:`Yardstick`'s) after every epoch and stops when pruned.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from cxr.data.augment import augment, draw_augment
from cxr.data.loader import N_TABULAR, PreparedData
from cxr.data.prepare import spec_for
from cxr.evaluation.metrics import choose_threshold
from cxr.models import build_model
from cxr.models.predictor import FORMAT, Predictor
from cxr.progress import progress_bar
from cxr.tracking import runs as tracking

if TYPE_CHECKING:
    import optuna

    from cxr.config import AugmentConfig, Config

log = logging.getLogger(__name__)


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


class TrialPrunedSignal(Exception):
    """Raised inside fit when Optuna prunes; tune turns it into optuna.TrialPruned."""

    def __init__(self, epoch: int, value: float) -> None:
        super().__init__(f"pruned at epoch {epoch} (objective {value:.4f})")
        self.epoch, self.value = epoch, value


def task_auroc(y: np.ndarray, probs: np.ndarray, task: str) -> float:
    """Validation AUROC for early stopping and pruning: macro over classes that have both labels."""
    from sklearn.metrics import roc_auc_score

    if task == "binary":
        return float(roc_auc_score(y, probs)) if 0 < y.sum() < len(y) else 0.5
    y2 = np.eye(probs.shape[1])[y] if task == "multiclass" else y
    scores = [roc_auc_score(y2[:, k], probs[:, k]) for k in range(probs.shape[1]) if 0 < y2[:, k].sum() < len(y2)]
    return float(np.mean(scores)) if scores else 0.5


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from cxr.errors import UserError

        raise UserError(f"train.device={name} but no CUDA device is available; use train.device=auto or cpu")
    return device


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic and device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def make_loss(data: PreparedData, train_idx: np.ndarray, cfg: "Config", device: torch.device):
    """Loss matching the task; with imbalance=weight, rarer classes weigh more."""
    y = data.targets[train_idx]
    weighted = cfg.train.imbalance == "weight"
    if data.task == "multiclass":
        counts = np.bincount(y, minlength=len(data.classes)).astype(np.float64)
        w = torch.tensor(len(y) / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32, device=device)
        return lambda logits, t: F.cross_entropy(
            logits, t, weight=w if weighted else None, label_smoothing=cfg.train.label_smoothing
        )
    y2 = y.reshape(len(y), -1)
    pos = y2.sum(0)
    pw = torch.tensor(np.clip((len(y2) - pos) / np.maximum(pos, 1), 0.01, 100.0), dtype=torch.float32, device=device)
    smooth = cfg.train.label_smoothing

    def loss(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(logits.shape)
        if smooth:
            t = t * (1 - smooth) + 0.5 * smooth
        return F.binary_cross_entropy_with_logits(logits, t, pos_weight=pw if weighted else None)

    return loss


def sample_weights(data: PreparedData, cfg: "Config") -> np.ndarray | None:
    """Balanced sampling: each class drawn equally often (multilabel falls back to loss weights)."""
    if cfg.train.imbalance != "sample" or data.task == "multilabel":
        return None
    y = data.targets.astype(np.int64)
    counts = np.bincount(y[data.split("train")], minlength=max(2, len(data.classes)))
    return (1.0 / np.maximum(counts, 1))[y]


def make_optimizer(model: torch.nn.Module, cfg: "Config") -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.train.lr)


def make_ema(model: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """Weight EMA (BN buffers included); its decay warms up so short runs are not dominated by init.

    One foreach update per step with the decay kept on the device: a per-tensor ``avg_fn`` calling
    ``float(n)`` cost a GPU sync per parameter. Same arithmetic as avg * d + current * (1 - d).
    """
    if decay <= 0:
        return None

    def ema(avg: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        n = n.double()
        d = torch.clamp((1 + n) / (10 + n), max=decay)
        keep, take = d.float(), (1 - d).float()  # rounded once, as Python float scalars were
        if avg[0].is_floating_point():
            torch._foreach_mul_(avg, keep)
            torch._foreach_add_(avg, torch._foreach_mul(current, take))
        else:  # BatchNorm's integer num_batches_tracked: computed in float, truncated on copy
            for a, c in zip(avg, current):
                a.copy_(a * keep + c * take)

    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema, use_buffers=True)


def make_scheduler(opt: torch.optim.Optimizer, cfg: "Config", steps_per_epoch: int):
    kind = cfg.train.scheduler
    if kind == "onecycle" and cfg.train.epochs * steps_per_epoch >= 8:  # too few steps for warm-up + decay
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.train.lr, total_steps=cfg.train.epochs * steps_per_epoch, pct_start=0.25
        ), "step"
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.train.epochs), "epoch"
    if kind == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.3, patience=2), "plateau"
    return None, "none"


@torch.inference_mode()
def predict_split(
    model: torch.nn.Module,
    data: PreparedData,
    index: np.ndarray,
    batch_size: int,
    device: torch.device,
    task: str,
    precision: str,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    model.eval()
    outs = []
    for x, _, t, _ in data.batches(index, batch_size, device=device):
        if transform is not None:
            x = transform(x)
        with _autocast(device, precision):
            logits = model(x.contiguous(memory_format=torch.channels_last), t if model.n_tabular else None).float()
        outs.append((torch.softmax(logits, 1) if task == "multiclass" else torch.sigmoid(logits)).cpu().numpy())
    probs = np.concatenate(outs)
    return probs[:, 0] if task == "binary" else probs


def _uses_bf16(device: torch.device, precision: str) -> bool:
    """``train.precision`` bf16, or auto on CUDA."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=_uses_bf16(device, precision))


def augmented_scores(
    model: torch.nn.Module,
    data: PreparedData,
    idx: np.ndarray,
    aug: "AugmentConfig",
    copies: int,
    seed: int,
    batch_size: int,
    device: torch.device,
    precision: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Targets and scores of ``copies`` passes over ``idx`` seen through ``aug``, drawn from ``seed``: the same
    seed and settings give the same copies, so models scored with them are compared on the same films."""
    gen = torch.Generator().manual_seed(seed)
    probs = [
        predict_split(
            model, data, idx, batch_size, device, data.task, precision, transform=lambda x: augment(x, aug, gen)
        )
        for _ in range(copies)
    ]
    return np.concatenate([data.targets[idx]] * copies), np.concatenate(probs)


def threshold_scores(
    model: torch.nn.Module,
    data: PreparedData,
    val_idx: np.ndarray,
    val_probs: np.ndarray | None,
    cfg: "Config",
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """The validation targets and scores the threshold is chosen on, scored in fp32 as the saved Predictor
    (evaluation, serving) scores them: a threshold chosen on bf16 scores could put a film near it on the
    other side there.

    With ``evaluate.threshold_augmented_copies`` = k > 0: k copies of the validation split seen through the
    training augmentation (seeded). Clean validation films are in-distribution (normals score near 0), so a
    cut-off chosen on them alone sits lower than the scores that films from another scanner or site get; the
    augmentation stands for that variation. Else the validation films as they are: ``val_probs`` when the
    caller has their fp32 scores at hand, otherwise scored here.
    """
    k = cfg.evaluate.threshold_augmented_copies
    if k == 0 or data.task == "multiclass" or cfg.train.augment.strength <= 0:
        if val_probs is None:
            val_probs = predict_split(model, data, val_idx, cfg.train.batch_size * 2, device, data.task, "fp32")
        return data.targets[val_idx], val_probs
    return augmented_scores(
        model, data, val_idx, cfg.train.augment, k, cfg.project.seed, cfg.train.batch_size * 2, device, "fp32"
    )


@dataclass(frozen=True)
class Yardstick:
    """What a tuning trial is judged on: AUROC on ``copies`` seeded copies of validation seen through one fixed
    augmentation, the same for every trial whatever augmentation the trial trains with.

    Clean validation is cut from the training distribution, so it rewards trials that train with weak
    augmentation and then fail on films from elsewhere (PneumoniaMNIST, 50-trial studies: clean validation
    ranked trials against the shifted test split, Spearman -0.22; this yardstick ranked them with it, +0.74).
    """

    augment: "AugmentConfig"
    copies: int
    seed: int
    # fixed, not the trial's batch size: augment draws per batch, so another batch size would be other films
    batch_size: int = 256

    @classmethod
    def from_config(cls, cfg: "Config") -> "Yardstick":
        """``train.augment``, ``tune.objective_copies`` copies drawn from ``project.seed``."""
        return cls(cfg.train.augment, cfg.tune.objective_copies, cfg.project.seed)

    def auroc(
        self, model: torch.nn.Module, data: PreparedData, idx: np.ndarray, device: torch.device, precision: str
    ) -> float:
        copies = self.copies if self.augment.strength > 0 else 1  # no augmentation: every copy is the same
        y, probs = augmented_scores(
            model, data, idx, self.augment, copies, self.seed, self.batch_size, device, precision
        )
        return task_auroc(y, probs, data.task)


def choose_thresholds(task: str, y: np.ndarray, probs: np.ndarray, cfg: "Config") -> Any:
    ev = cfg.evaluate
    if task == "binary":
        if not 0 < y.sum() < len(y):
            from cxr.errors import UserError

            raise UserError("the validation split has one class only, so no threshold can be chosen; use more data")
        return float(choose_threshold(y, probs, method=ev.threshold, target_sensitivity=ev.target_sensitivity))
    if task == "multilabel":
        out = []
        for k in range(y.shape[1]):
            if 0 < y[:, k].sum() < len(y):
                out.append(
                    float(
                        choose_threshold(
                            y[:, k], probs[:, k], method=ev.threshold, target_sensitivity=ev.target_sensitivity
                        )
                    )
                )
            else:
                out.append(0.5)  # a class absent from validation: no evidence to move off 0.5
        return out
    return None


def model_info(
    cfg: "Config", architecture: dict[str, Any], data: PreparedData, threshold: Any, **training: Any
) -> dict[str, Any]:
    """model.json: everything needed to use the weights on a raw image, plus lineage."""
    return {
        "format": FORMAT,
        "architecture": architecture,
        "preprocess": spec_for(cfg, cfg.model.image_size).to_dict(),
        "read_limits": {
            "min_side": cfg.imaging.min_side,
            "max_pixels": cfg.imaging.max_pixels,
            "max_bytes": cfg.imaging.max_bytes,
        },
        "task": data.task,
        "labels": data.classes,
        "threshold": threshold,
        "threshold_method": cfg.evaluate.threshold,
        "threshold_augmented_copies": cfg.evaluate.threshold_augmented_copies,
        "training": {
            "dataset_hash": data.card["dataset_hash"],
            "source": data.card["source"],
            "synthetic": data.card.get("synthetic", False),
            **training,
        },
    }


@dataclass
class Member:
    """One trained network: its best weights (loaded), where they were found and what it cost."""

    model: torch.nn.Module
    seed: int
    best_epoch: int
    best_val_auroc: float
    best_objective: float  # the yardstick's AUROC at the best epoch (best_val_auroc without one)
    val_probs: np.ndarray
    history: list[dict[str, float]]
    images_seen: int
    train_seconds: float


def train_member(
    cfg: "Config",
    data: PreparedData,
    seed: int,
    device: torch.device,
    *,
    active: bool,
    trial: "optuna.Trial | None" = None,
    yardstick: Yardstick | None = None,
    member: tuple[int, int] = (1, 1),
    step0: int = 0,
    epoch_hook: Callable[[torch.nn.Module], dict[str, float]] | None = None,
) -> Member:
    """Train one network from ``seed``; early-stops on ``train.early_stopping.monitor`` (clean validation AUROC, or
    the yardstick's) and returns the best epoch's weights.

    With a ``yardstick`` its AUROC is logged every epoch and is what the Optuna ``trial`` is told (else the
    validation AUROC). ``member`` = (i, n) of an ensemble: with n > 1 the MLflow metrics are named
    ``member<i>/...``. ``step0``: epochs trained before this member, so an Optuna trial sees one increasing step.
    ``epoch_hook(model)``: figures of the validated model, added to each epoch's history row and MLflow metrics.
    """
    gen = seed_everything(seed, cfg.train.deterministic, device)
    train_idx, val_idx = data.split("train"), data.split("val")
    n_tab = N_TABULAR if cfg.model.tabular else 0
    model = build_model(
        cfg.model.arch,
        data.n_outputs,
        weights=cfg.model.weights,
        dropout=cfg.model.dropout,
        width=cfg.model.width,
        n_tabular=n_tab,
    )
    model = model.to(device).to(memory_format=torch.channels_last)
    loss_fn = make_loss(data, train_idx, cfg, device)
    opt = make_optimizer(model, cfg)
    bs = cfg.train.batch_size
    steps = int(np.ceil(len(train_idx) / bs))
    if cfg.train.max_train_batches:
        steps = min(steps, cfg.train.max_train_batches)
    sched, sched_kind = make_scheduler(opt, cfg, steps)
    ema = make_ema(model, cfg.train.ema_decay)
    scored = ema.module if ema is not None else model  # what is validated and saved
    weights = sample_weights(data, cfg)
    i, n = member
    prefix, label = (f"member{i}/", f"member {i}/{n} ") if n > 1 else ("", "")
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"score": -1.0, "auroc": -1.0, "epoch": 0, "state": None}
    since_best = 0
    seen, train_time = 0, 0.0
    for epoch in range(1, cfg.train.epochs + 1):
        model.train()
        t0, n_batches = time.perf_counter(), 0
        total_loss = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per step
        batches = data.batches(train_idx, bs, shuffle=True, generator=gen, sample_weights=weights, device=device)
        with progress_bar(f"{label}epoch {epoch}/{cfg.train.epochs}", total=steps) as advance:
            for b, (x, y, t, _) in enumerate(batches):
                if b >= steps:
                    break
                x = augment(x, cfg.train.augment, gen).contiguous(memory_format=torch.channels_last)
                with _autocast(device, cfg.train.precision):
                    logits = model(x, t if n_tab else None)
                loss = loss_fn(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched_kind == "step":
                    sched.step()
                if ema is not None:
                    ema.update_parameters(model)
                total_loss += loss.detach()
                n_batches += 1
                seen += len(x)
                advance(**({"loss": float(total_loss) / n_batches} if n_batches % 20 == 0 else {}))
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        val_probs = predict_split(scored, data, val_idx, bs * 2, device, data.task, cfg.train.precision)
        val_auroc = task_auroc(data.targets[val_idx], val_probs, data.task)
        if sched_kind == "epoch":
            sched.step()
        elif sched_kind == "plateau":
            sched.step(val_auroc)
        row = {
            "train_loss": float(total_loss) / max(1, n_batches),
            "val_auroc": val_auroc,
            "lr": opt.param_groups[0]["lr"],
            "epoch_seconds": epoch_time,
            "train_images_per_second": min(steps * bs, len(train_idx)) / max(epoch_time, 1e-9),
        }
        objective = val_auroc
        if yardstick is not None:
            objective = row["val_auroc_augmented"] = yardstick.auroc(scored, data, val_idx, device, cfg.train.precision)
        if epoch_hook is not None:
            row |= epoch_hook(scored)
        history.append(row if n == 1 else {"member": i, **row})
        if active:
            import mlflow

            mlflow.log_metrics({prefix + k: v for k, v in row.items()}, step=epoch)
        log.info("%sepoch %d: loss %.4f val AUROC %.4f (%.1fs)", label, epoch, row["train_loss"], val_auroc, epoch_time)
        score = objective if cfg.train.early_stopping.monitor == "augmented_val_auroc" else val_auroc
        if score > best["score"] + cfg.train.early_stopping.min_delta:
            # val_probs kept: with evaluate.threshold_augmented_copies=0 the threshold is chosen on them
            best = {
                "score": score,
                "auroc": val_auroc,
                "epoch": epoch,
                "state": copy.deepcopy(scored.state_dict()),
                "val_probs": val_probs,
                "objective": objective,
            }
            since_best = 0
        else:
            since_best += 1
        if trial is not None:
            trial.report(objective, step0 + epoch)
            if trial.should_prune():
                if active:
                    import mlflow

                    mlflow.set_tags({"trial_state": "PRUNED", "epochs_trained": str(step0 + epoch)})
                raise TrialPrunedSignal(step0 + epoch, objective)
        if since_best >= cfg.train.early_stopping.patience:
            log.info("%searly stopping at epoch %d; best epoch %d", label, epoch, best["epoch"])
            break
    model.load_state_dict(best["state"])
    return Member(
        model=model,
        seed=seed,
        best_epoch=best["epoch"],
        best_val_auroc=best["auroc"],
        best_objective=best["objective"],
        val_probs=best["val_probs"],
        history=history,
        images_seen=seen,
        train_seconds=train_time,
    )


def saved_model(cfg: "Config", networks: list[torch.nn.Module]) -> torch.nn.Module:
    """What is saved: the network, or an :class:`~cxr.models.Ensemble` of them, averaged over
    ``model.tta_views`` fixed views drawn from ``train.augment`` at ``model.tta_strength`` when that is > 0."""
    from cxr.models import Ensemble, TestTimeAugmentation

    model = networks[0] if len(networks) == 1 else Ensemble(networks)
    k = cfg.model.tta_views
    if k == 0:
        return model
    views_of = cfg.train.augment.model_copy(update={"strength": cfg.model.tta_strength})
    views = draw_augment(k, views_of, torch.Generator().manual_seed(cfg.project.seed))
    return TestTimeAugmentation(model, views).to(next(model.parameters()).device)


def fit(
    cfg: "Config",
    trial: "optuna.Trial | None" = None,
    *,
    model_dir: Path | None = None,
    run_name: str | None = None,
    nested: bool = False,
    log_model: bool = True,
    extra_tags: dict[str, str] | None = None,
    run_id: str | None = None,
    yardstick: Yardstick | None = None,
    epoch_hook: Callable[[torch.nn.Module], dict[str, float]] | None = None,
) -> FitResult:
    """Train, choose the threshold, save the model; ``run_id`` continues an existing MLflow run (a tuning trial's),
    ``yardstick`` is what that trial is judged on (see :class:`Yardstick`); ``epoch_hook``: see :func:`train_member`.

    With ``train.ensemble`` = n > 1, n networks are trained with seeds seed .. seed+n-1 and saved as one
    :class:`~cxr.models.Ensemble`; the threshold is chosen on the ensemble's validation scores.
    """
    if cfg.model.arch == "logistic_regression":
        from cxr.baseline import fit_baseline

        return fit_baseline(
            cfg,
            model_dir=model_dir,
            run_name=run_name,
            nested=nested,
            log_model=log_model,
            extra_tags=extra_tags,
            run_id=run_id,
        )
    device = resolve_device(cfg.train.device)
    data = PreparedData(cfg.paths.prepared, cfg.model.image_size)
    train_idx, val_idx = data.split("train"), data.split("val")
    if len(train_idx) == 0 or len(val_idx) == 0:
        from cxr.errors import UserError

        raise UserError(f"the prepared data needs train and val images (train={len(train_idx)}, val={len(val_idx)})")
    model_dir = Path(model_dir or cfg.paths.model)
    if yardstick is None and cfg.train.early_stopping.monitor == "augmented_val_auroc":
        yardstick = Yardstick.from_config(cfg)  # a tuning trial's comes from the study's config instead
    n = cfg.train.ensemble
    tags = {**tracking.lineage_tags(data.card), **(extra_tags or {})}
    with tracking.run(cfg, name=run_name, nested=nested, tags=tags, run_id=run_id) as active:
        run_id = active.info.run_id if active else None
        if active:
            import mlflow

            mlflow.log_params(cfg.flat())
            mlflow.log_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config/params.yaml")
            tracking.log_dict_artifact(data.card, "data/card.json")
        members: list[Member] = []
        for i in range(n):
            members.append(
                train_member(
                    cfg,
                    data,
                    cfg.project.seed + i,
                    device,
                    active=bool(active),
                    trial=trial,
                    yardstick=yardstick,
                    member=(i + 1, n),
                    epoch_hook=epoch_hook,
                    step0=sum(len(m.history) for m in members),
                )
            )
        model = saved_model(cfg, [m.model for m in members])
        if model is members[0].model:  # the network itself, as its best epoch scored it
            val_auroc, objective = members[0].best_val_auroc, members[0].best_objective
            # the epoch's validation scores, unless they were bf16 (threshold_scores re-scores when it needs them)
            val_probs = None if _uses_bf16(device, cfg.train.precision) else members[0].val_probs
        else:  # an ensemble or test-time views: score validation as the saved model will be used
            val_probs = predict_split(model, data, val_idx, cfg.train.batch_size * 2, device, data.task, "fp32")
            val_auroc = task_auroc(data.targets[val_idx], val_probs, data.task)
            objective = (
                val_auroc if yardstick is None else yardstick.auroc(model, data, val_idx, device, cfg.train.precision)
            )
        threshold = choose_thresholds(data.task, *threshold_scores(model, data, val_idx, val_probs, cfg, device), cfg)
        history = [row for m in members for row in m.history]
        best_epoch = members[0].best_epoch if n == 1 else [m.best_epoch for m in members]
        info = model_info(
            cfg,
            model.spec,
            data,
            threshold,
            run_id=run_id,
            best_epoch=best_epoch,
            val_auroc=val_auroc,
            epochs_trained=len(history),
            git_commit=tags.get("git_commit"),
            **(
                {
                    "members": [
                        {"seed": m.seed, "best_epoch": m.best_epoch, "val_auroc": m.best_val_auroc} for m in members
                    ]
                }
                if n > 1
                else {}
            ),
        )
        predictor = Predictor(model.cpu().float(), info)
        predictor.save(model_dir)
        ips = sum(m.images_seen for m in members) / max(sum(m.train_seconds for m in members), 1e-9)
        if active:
            import mlflow

            mlflow.log_metrics(
                {
                    "best_val_auroc": val_auroc,
                    "epochs_trained": len(history),
                    "train_images_per_second_mean": ips,
                    **({"best_val_auroc_augmented": objective} if yardstick is not None else {}),
                    **(
                        {"best_epoch": best_epoch}
                        if n == 1
                        else {f"member{i + 1}/best_val_auroc": m.best_val_auroc for i, m in enumerate(members)}
                    ),
                }
            )
            mlflow.set_tags({"trial_state": "COMPLETE"} if trial is not None else {})
            if log_model:
                tracking.log_cxr_model(model_dir, tracking.example_batch(cfg.model.image_size))
    return FitResult(
        model_dir=model_dir,
        run_id=run_id,
        best_epoch=best_epoch,
        best_val_auroc=val_auroc,
        epochs_trained=len(history),
        images_per_second=ips,
        history=history,
        threshold=threshold,
        objective=objective,
    )
