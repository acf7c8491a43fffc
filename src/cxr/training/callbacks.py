"""Everything around the training loop, as callbacks: timing, extra figures, MLflow metrics, early stopping,
Optuna pruning and interruption. Each is small and testable alone; the loop only calls the hooks.

Hooks, in order within an epoch: ``on_epoch_start`` → (the epoch trains) → ``on_epoch_trained`` →
(validation AUROC) → ``on_validated`` (figures that the monitor may need) → (the loop keeps the best epoch) →
``on_epoch_end`` (logging, decisions: set ``state.stop`` or raise to end training).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlflow
import torch

from cxr.data.loader import PreparedData
from cxr.training.scoring import Yardstick

if TYPE_CHECKING:
    import optuna


@dataclass
class EpochState:
    """One epoch of one network, as the callbacks see it."""

    epoch: int  # 1-based, within this network
    step: int  # epochs trained in this fit before this one plus this one: one increasing step for a trial
    member: tuple[int, int]  # (i, n) of an ensemble
    model: torch.nn.Module  # what is validated and saved (the EMA weights when on)
    row: dict[str, float] = field(default_factory=dict)  # this epoch's figures, logged and kept in the history
    objective: float = 0.0  # what a tuning trial is judged on (val AUROC unless a yardstick says otherwise)
    improved: bool = False  # the loop kept this epoch as the best so far
    epochs_since_best: int = 0
    stop: bool = False


class Callback:
    """Override what you need; every hook receives the epoch's state."""

    def on_epoch_start(self, state: EpochState) -> None: ...

    def on_epoch_trained(self, state: EpochState, images: int, batches: int) -> None: ...

    def on_validated(self, state: EpochState) -> None: ...

    def on_epoch_end(self, state: EpochState) -> None: ...


class Timer(Callback):
    """Epoch wall time and training images/s (after a CUDA sync, so queued kernels are counted)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self.images, self._t0 = device, 0.0, 0, 0.0

    def on_epoch_start(self, state: EpochState) -> None:
        self._t0 = time.perf_counter()

    def on_epoch_trained(self, state: EpochState, images: int, batches: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self._t0
        self.seconds, self.images = self.seconds + seconds, self.images + images
        state.row["epoch_seconds"] = seconds
        state.row["train_images_per_second"] = images / max(seconds, 1e-9)

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


class ScoreYardstick(Callback):
    """The tuning yardstick's AUROC every epoch: logged, and what a trial (or the augmented monitor) follows."""

    def __init__(self, yardstick: Yardstick, data: PreparedData, device: torch.device, precision: str) -> None:
        self.yardstick, self.data, self.device, self.precision = yardstick, data, device, precision
        self.val_idx = data.split("val")

    def on_validated(self, state: EpochState) -> None:
        value = self.yardstick.auroc(state.model, self.data, self.val_idx, self.device, self.precision)
        state.row["val_auroc_augmented"] = state.objective = value


class EpochFigures(Callback):
    """Diagnostics: ``hook(model)`` returns figures of the validated model, added to every epoch's row."""

    def __init__(self, hook: Callable[[torch.nn.Module], dict[str, float]]) -> None:
        self.hook = hook

    def on_validated(self, state: EpochState) -> None:
        state.row |= self.hook(state.model)


class MlflowMetrics(Callback):
    """Every epoch's row to the active MLflow run (``member<i>/`` names for an ensemble's networks)."""

    def on_epoch_end(self, state: EpochState) -> None:
        i, n = state.member
        prefix = f"member{i}/" if n > 1 else ""
        mlflow.log_metrics({prefix + k: v for k, v in state.row.items()}, step=state.epoch)


class EarlyStopping(Callback):
    """Stop when the monitored figure has not improved for ``patience`` epochs."""

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def on_epoch_end(self, state: EpochState) -> None:
        if state.epochs_since_best >= self.patience:
            state.stop = True


class TrialPruned(Exception):
    """Raised inside fit when Optuna prunes; tuning turns it into optuna.TrialPruned."""

    def __init__(self, epoch: int, value: float) -> None:
        super().__init__(f"pruned at epoch {epoch} (objective {value:.4f})")
        self.epoch, self.value = epoch, value


class OptunaPruning(Callback):
    """Report the objective to the trial every epoch; end the fit when Optuna prunes it."""

    def __init__(self, trial: "optuna.Trial", tracked: bool) -> None:
        self.trial, self.tracked = trial, tracked

    def on_epoch_end(self, state: EpochState) -> None:
        self.trial.report(state.objective, state.step)
        if self.trial.should_prune():
            if self.tracked:
                mlflow.set_tags({"trial_state": "PRUNED", "epochs_trained": str(state.step)})
            raise TrialPruned(state.step, state.objective)


class StopOnEvent(Callback):
    """End the fit at the next epoch once ``event`` is set (``cxr tune`` sets it on Ctrl-C)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def on_epoch_end(self, state: EpochState) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt


def run_hook(callbacks: list[Callback], name: str, state: EpochState, *args: Any) -> None:
    for callback in callbacks:
        getattr(callback, name)(state, *args)
