"""The training loop of one network: epochs of augmented batches, validation, the best epoch kept.

Everything else (timing, logging, early stopping, pruning, diagnostics) is a callback (cxr.training.callbacks).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cxr.config import AugmentConfig
from cxr.data.augment import apply_augment, augment, draw_augment
from cxr.data.loader import N_TABULAR, PreparedData, Shard
from cxr.models.build import build_model
from cxr.progress import progress_bar
from cxr.training import distributed
from cxr.training.callbacks import Callback, EpochState, run_hook
from cxr.training.distributed import Ranks
from cxr.training.freeze import Frozen
from cxr.training.scoring import autocast, predict_split, task_auroc
from cxr.training.setup import make_ema, make_loss, make_optimizer, make_scheduler, sample_weights, seed_everything

if TYPE_CHECKING:
    from cxr.config import Config

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One trained network: its best weights (loaded), where they were found and its history."""

    model: torch.nn.Module
    seed: int
    best_epoch: int
    best_val_auroc: float
    best_objective: float  # the monitored yardstick's AUROC at the best epoch (best_val_auroc without one)
    val_probs: np.ndarray  # validation scores at the best epoch, in the training precision
    history: list[dict[str, float]]


@dataclass
class _Best:
    score: float = -1.0
    auroc: float = -1.0
    objective: float = -1.0
    epoch: int = 0
    state: dict[str, Any] | None = None
    val_probs: np.ndarray | None = None


class _Network:
    """The network, its optimiser, schedule and EMA, built from the config in a fixed order (seeded); the part
    ``model.freeze`` holds fixed until ``model.unfreeze_epoch``."""

    def __init__(self, cfg: "Config", data: PreparedData, device: torch.device, ranks: Ranks) -> None:
        self.train_idx = data.split("train")
        self.n_tab = N_TABULAR if cfg.model.tabular else 0
        m = cfg.model
        model = build_model(
            m.arch,
            data.n_outputs,
            weights=m.weights,
            dropout=m.dropout,
            width=m.width,
            n_tabular=self.n_tab,
            image_size=m.image_size,
        )
        self.model = model.to(device).to(memory_format=torch.channels_last)
        self.frozen, self.unfreeze_epoch = Frozen(self.model, m.freeze), m.unfreeze_epoch
        if self.frozen.names and m.weights.strip().lower() in ("", "none"):
            log.warning("model.freeze=%s holds randomly initialised layers (model.weights=none)", m.freeze)
        self.loss_fn = make_loss(data, self.train_idx, cfg, device)
        self.opt = make_optimizer(self.model, cfg)
        steps = int(np.ceil(len(self.train_idx) / cfg.train.batch_size))
        self.steps = min(steps, cfg.train.max_train_batches) if cfg.train.max_train_batches else steps
        self.sched, self.sched_kind = make_scheduler(self.opt, cfg, self.steps)
        self.ema = make_ema(self.model, cfg.train.ema_decay)
        self.scored = self.ema.module if self.ema is not None else self.model  # what is validated and saved
        self.device, self.ranks = device, ranks
        self.forward = distributed.wrap(self.model, device, ranks)  # what trains: DDP when data-parallel

    def start_epoch(self, epoch: int) -> None:
        """Training mode, the frozen part held; from ``model.unfreeze_epoch`` everything trains."""
        if epoch == self.unfreeze_epoch and self.frozen.names:
            self.frozen.release()
            self.forward = distributed.wrap(self.model, self.device, self.ranks)  # DDP reduces only what trained
        self.model.train()
        self.frozen.hold()

    def step(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, precision: str, device: torch.device):
        with autocast(device, precision):
            logits = self.forward(x, t if self.n_tab else None)
        loss = self.loss_fn(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.sched_kind == "step":
            self.sched.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return loss.detach()

    def settle_frozen(self) -> None:
        """Reset the weight EMA's frozen tensors to the network's (averaging a constant drifts by rounding): once
        before the EMA is read, not after every step."""
        if self.ema is not None:
            self.frozen.keep_in(self.ema.module)

    def end_epoch(self, val_auroc: float) -> None:
        if self.sched_kind == "epoch":
            self.sched.step()
        elif self.sched_kind == "plateau":
            self.sched.step(val_auroc)


def augment_shard(
    x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator, shard: Shard | None, n: int
) -> torch.Tensor:
    """Augment this rank's rows as a single process would its global batch of ``n``: the draws for all ``n``
    (so every rank's generator stays in step), this rank's taken."""
    if shard is None or cfg.strength <= 0:
        return augment(x, cfg, gen)
    return apply_augment(x, draw_augment(n, cfg, gen)[torch.from_numpy(shard.positions(n))])


def _train_epoch(net: _Network, cfg: "Config", data: PreparedData, gen, weights, device, ranks, label) -> tuple:
    """One pass over the training batches: (summed loss, batches, images), over all ranks when data-parallel."""
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per step
    n_batches = images = 0
    bs, n_train = cfg.train.batch_size, len(net.train_idx)
    batches = data.batches(
        net.train_idx, bs, shuffle=True, generator=gen, sample_weights=weights, device=device, shard=ranks.shard
    )
    with progress_bar(label, total=net.steps, plain_lines=False) as advance:
        for b, (x, y, t, _) in enumerate(batches):
            if b >= net.steps:
                break
            x = augment_shard(x, cfg.train.augment, gen, ranks.shard, min(bs, n_train - b * bs))
            total += net.step(x.contiguous(memory_format=torch.channels_last), y, t, cfg.train.precision, device)
            n_batches, images = n_batches + 1, images + len(x)
            advance(**({"loss": float(total) / n_batches} if n_batches % 20 == 0 else {}))
    total, images = distributed.epoch_totals(total, images, ranks)
    return total, n_batches, images


@dataclass
class _Kept:
    """Rank 0's record over one network's epochs: the history, the best epoch so far and epochs since it."""

    history: list[dict[str, float]] = field(default_factory=list)
    best: _Best = field(default_factory=_Best)
    since_best: int = 0


def train_network(
    cfg: "Config",
    data: PreparedData,
    seed: int,
    device: torch.device,
    callbacks: list[Callback],
    *,
    member: tuple[int, int] = (1, 1),
    step0: int = 0,
    ranks: Ranks = distributed.SINGLE,
) -> Member:
    """Train one network from ``seed``; keep the epoch with the best ``train.early_stopping.monitor`` figure
    (clean validation AUROC, or the yardstick's when a callback sets the objective) and return it loaded.
    Data-parallel, every rank trains its shard and follows rank 0, which alone validates and keeps the best."""
    gen = seed_everything(seed, cfg.train.deterministic, device)
    net, weights = _Network(cfg, data, device, ranks), sample_weights(data, cfg)
    distributed.decorrelate_dropout(seed, ranks)
    label = f"member {member[0]}/{member[1]} " if member[1] > 1 else ""
    kept = _Kept()
    with progress_bar(f"{label}training {cfg.model.arch}", total=cfg.train.epochs) as epochs:
        for epoch in range(1, cfg.train.epochs + 1):
            state = EpochState(epoch=epoch, step=step0 + epoch, member=member, model=net.scored)
            run_hook(callbacks, "on_epoch_start", state)
            net.start_epoch(epoch)
            total, n_batches, images = _train_epoch(
                net, cfg, data, gen, weights, device, ranks, f"{label}epoch {epoch}/{cfg.train.epochs}"
            )
            run_hook(callbacks, "on_epoch_trained", state, images, n_batches)
            if ranks.is_main:
                _validate(net, cfg, data, device, callbacks, state, kept, float(total) / max(1, n_batches), n_batches)
                epochs(loss=state.row["train_loss"], val_auroc=state.row["val_auroc"])
            val_auroc, state.stop = distributed.decisions_of_rank0(
                state.row.get("val_auroc", float("nan")), state.stop, ranks, device
            )
            if not ranks.is_main:
                net.end_epoch(val_auroc)  # as rank 0 stepped its schedule in _validate
            if state.stop:
                log.info("%searly stopping at epoch %d; best epoch %d", label, epoch, kept.best.epoch)
                break
    if ranks.is_main:
        net.model.load_state_dict(kept.best.state)
    best = kept.best
    return Member(
        model=net.model,
        seed=seed,
        best_epoch=best.epoch,
        best_val_auroc=best.auroc,
        best_objective=best.objective,
        val_probs=best.val_probs,
        history=kept.history,
    )


def _validate(
    net: _Network,
    cfg: "Config",
    data: PreparedData,
    device: torch.device,
    callbacks: list[Callback],
    state: EpochState,
    kept: _Kept,
    train_loss: float,
    steps: int,
) -> None:
    """The end of an epoch (rank 0's alone when data-parallel): validation AUROC, the schedule's step, the
    callbacks and the best epoch kept."""
    val_idx, watch = data.split("val"), cfg.train.early_stopping
    net.settle_frozen()
    val_probs = predict_split(
        net.scored, data, val_idx, cfg.train.batch_size * 2, device, data.task, cfg.train.precision
    )
    val_auroc = task_auroc(data.targets[val_idx], val_probs, data.task)
    net.end_epoch(val_auroc)
    state.row = {
        "train_loss": train_loss,
        "val_auroc": val_auroc,
        "lr": net.opt.param_groups[0]["lr"],
        "train_steps": steps,
        **state.row,
    }
    state.objective = val_auroc
    run_hook(callbacks, "on_validated", state)
    kept.history.append(state.row if state.member[1] == 1 else {"member": state.member[0], **state.row})
    score = state.objective if watch.monitor == "augmented_val_auroc" else val_auroc
    if score > kept.best.score + watch.min_delta:
        # val_probs kept: with evaluate.threshold_augmented_copies=0 the threshold is chosen on them
        best_state = copy.deepcopy(net.scored.state_dict())
        kept.best = _Best(score, val_auroc, state.objective, state.epoch, best_state, val_probs)
        kept.since_best, state.improved = 0, True
    else:
        kept.since_best += 1
    state.epochs_since_best = kept.since_best
    run_hook(callbacks, "on_epoch_end", state)
