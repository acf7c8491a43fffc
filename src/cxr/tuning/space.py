"""The search space: a trial's parameters as dotted config overrides, checked before any trial runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cxr.errors import UserError

if TYPE_CHECKING:
    import optuna

    from cxr.config import Config, SpaceParam


class TuneError(UserError):
    """A study that cannot run as configured."""


def suggest(trial: "optuna.Trial", space: dict[str, "SpaceParam"]) -> dict[str, Any]:
    """Trial parameters as dotted config overrides."""
    params: dict[str, Any] = {}
    for key, p in space.items():
        if p.type == "categorical":
            params[key] = trial.suggest_categorical(key, p.choices)
        elif p.type == "int":
            params[key] = trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            params[key] = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)
    return params


def check_space(cfg: "Config") -> None:
    """Fail before any trial runs if a key or a choice would make an invalid config."""
    if not cfg.tune.space:
        raise TuneError("tune.space is empty: add dotted parameters to params.yaml (see README, '2. Tune')")
    for key, p in cfg.tune.space.items():
        for value in p.choices if p.type == "categorical" else [p.low, p.high]:
            if p.type == "int":
                value = int(value)
            try:
                cfg.override({key: value})
            except UserError as exc:
                raise TuneError(f"tune.space.{key}: value {value!r} is not a valid setting: {exc}") from None
