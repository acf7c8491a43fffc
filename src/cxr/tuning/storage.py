"""Where a study lives (SQLite, PostgreSQL), what its trials are judged on, and what it holds so far."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

from cxr.errors import UserError
from cxr.training.scoring import Yardstick
from cxr.tuning.space import TuneError

if TYPE_CHECKING:
    import optuna

    from cxr.config import Config


# The objective of a study that records none: studies made before objectives were recorded judged on this.
CLEAN_VALIDATION = {"objective": "val_auroc"}


def make_storage(cfg: "Config", url: str) -> "optuna.storages.RDBStorage":
    import optuna

    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://") :]
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=cfg.tune.heartbeat_interval, grace_period=cfg.tune.grace_period
            )
        except Exception as exc:  # unreachable server, bad URL, missing driver: say which storage
            # workers starting together race to create the schema: the loser finds it made on retry
            if attempt == 2 or "already exists" not in str(exc):
                raise TuneError(f"cannot open the Optuna storage {redact(url)}: {exc}") from None
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def redact(url: str) -> str:
    """A storage URL without its password, safe for logs and MLflow tags."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}@{host}"
    return url


def make_pruner(cfg: "Config") -> "optuna.pruners.BasePruner":
    import optuna

    if cfg.tune.pruner in ("median", "percentile"):  # the median pruner is optuna's PercentilePruner(50)
        keep = 50.0 if cfg.tune.pruner == "median" else cfg.tune.keep_percentile
        startup = cfg.tune.startup_trials if cfg.tune.pruner_startup_trials is None else cfg.tune.pruner_startup_trials
        return optuna.pruners.PercentilePruner(keep, n_startup_trials=startup, n_warmup_steps=cfg.tune.warmup_epochs)
    if cfg.tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=max(1, cfg.tune.warmup_epochs), max_resource=cfg.train.epochs
        )
    return optuna.pruners.NopPruner()


def load_study(cfg: "Config", name: str, storage: "optuna.storages.RDBStorage", shared: bool) -> "optuna.Study":
    import optuna

    existing = _count_existing(storage, name)
    # Resuming reseeds past the trials already made, so a resumed study does not replay its first proposals;
    # workers sharing a server storage also mix in their pid so their random start-up trials differ.
    seed = cfg.tune.sampler_seed + existing + (os.getpid() if shared else 0)
    sampler = optuna.samplers.TPESampler(
        seed=seed, multivariate=True, n_startup_trials=cfg.tune.startup_trials, constant_liar=True
    )
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=sampler,
        pruner=make_pruner(cfg),
        direction=cfg.tune.direction,
        load_if_exists=True,
    )
    if study.direction.name.lower() != cfg.tune.direction:
        raise TuneError(f"study {name!r} exists with direction {study.direction.name.lower()}; use another --study")
    _same_objective(cfg, study, existing)
    return study


def make_yardstick(cfg: "Config") -> "Yardstick | None":
    """The configured augmentation, not a trial's own: every trial is measured on the same films."""

    if cfg.tune.objective != "augmented_val_auroc":
        if cfg.train.early_stopping.monitor == "augmented_val_auroc":
            raise UserError(
                "train.early_stopping.monitor=augmented_val_auroc picks each trial's epoch on the tuning "
                "yardstick, which the trial is then judged on: use it with tune.objective=augmented_val_auroc"
            )
        return None
    return Yardstick.from_config(cfg)


def objective_spec(cfg: "Config") -> dict[str, Any]:
    """What a trial's value means; trials are only comparable within one of these."""
    yardstick = make_yardstick(cfg)
    if yardstick is None:
        return dict(CLEAN_VALIDATION)
    return {
        "objective": cfg.tune.objective,
        "copies": yardstick.copies,
        "seed": yardstick.seed,
        "batch_size": yardstick.batch_size,
        "augment": yardstick.augment.model_dump(mode="json"),
    }


def _same_objective(cfg: "Config", study: "optuna.Study", existing: int) -> None:
    """Record the study's objective when it is made; refuse to add trials judged another way to it."""
    mine = objective_spec(cfg)
    recorded = study.user_attrs.get("objective")
    if recorded is None and not existing:
        study.set_user_attr("objective", mine)
        return
    recorded = recorded or CLEAN_VALIDATION
    if recorded != mine:
        raise TuneError(
            f"study {study.study_name!r} judges its trials on {json.dumps(recorded, sort_keys=True)}, this "
            f"run would judge on {json.dumps(mine, sort_keys=True)}; use another --study, or the study's "
            "settings (tune.objective, tune.objective_copies, train.augment, project.seed)"
        )


def _count_existing(storage: "optuna.storages.RDBStorage", name: str) -> int:
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return 0
    return len(storage.get_all_trials(study_id, deepcopy=False))


def counts(study: "optuna.Study") -> dict[str, int]:
    out = {s: 0 for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    out["finished"] = out["COMPLETE"] + out["PRUNED"]
    return out


def best_trial(study: "optuna.Study") -> "optuna.trial.FrozenTrial | None":
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:
        return None
    return (
        max(complete, key=lambda t: t.value)
        if study.direction.name == "MAXIMIZE"
        else min(complete, key=lambda t: t.value)
    )
