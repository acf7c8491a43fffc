"""The configured pruner decides like the study it belongs to: median vs a harder percentile."""

from __future__ import annotations

import optuna
import pytest

from cxr.config import Config
from cxr.tuning.storage import make_pruner

optuna.logging.set_verbosity(optuna.logging.WARNING)


def decide(pruner: str, value_at_epoch_2: float, *overrides: str) -> bool:
    """Four finished trials with validation AUROC 0.90/0.92/0.94/0.96 at epoch 2; would a new trial
    reporting ``value_at_epoch_2`` there be pruned (under ``overrides`` of the tune settings)?"""
    cfg = Config().override(
        [
            f"tune.pruner={pruner}",
            "tune.startup_trials=2",
            "tune.warmup_epochs=1",
            "tune.keep_percentile=25",
            *overrides,
        ]
    )
    study = optuna.create_study(direction="maximize", pruner=make_pruner(cfg))
    for v in (0.90, 0.92, 0.94, 0.96):
        study.add_trial(
            optuna.trial.create_trial(value=v, intermediate_values={1: v - 0.05, 2: v}, distributions={}, params={})
        )
    trial = study.ask()
    trial.report(value_at_epoch_2 - 0.05, 1)
    trial.report(value_at_epoch_2, 2)
    return bool(trial.should_prune())


@pytest.mark.parametrize(
    ("pruner", "value", "pruned"),
    [
        ("median", 0.935, False),  # above the median (0.93) of the earlier trials at epoch 2
        ("percentile", 0.935, True),  # ... but not in their top 25%
        ("percentile", 0.955, False),  # in the top 25%
        ("median", 0.91, True),
        ("none", 0.50, False),
    ],
)
def test_pruners_keep_the_configured_share(pruner, value, pruned):
    assert decide(pruner, value) is pruned


def test_pruner_startup_trials_apart_from_the_samplers():
    """Four finished trials: with tune.startup_trials=5 nothing is pruned yet, unless the pruner's own start-up
    (tune.pruner_startup_trials) is shorter."""
    assert decide("median", 0.5, "tune.startup_trials=5") is False
    assert decide("median", 0.5, "tune.startup_trials=5", "tune.pruner_startup_trials=3") is True


def test_warmup_epochs_protect_early_epochs():
    cfg = Config().override(["tune.pruner=percentile", "tune.startup_trials=0", "tune.warmup_epochs=5"])
    study = optuna.create_study(direction="maximize", pruner=make_pruner(cfg))
    for v in (0.9, 0.95):
        study.add_trial(optuna.trial.create_trial(value=v, intermediate_values={2: v}, distributions={}, params={}))
    trial = study.ask()
    trial.report(0.5, 2)
    assert not trial.should_prune()


def test_trials_are_judged_on_the_yardstick_their_epochs_were_picked_on():
    """The yardstick is the study's (same films for every trial); picking each trial's epoch on it while the
    study is judged on clean validation would mix two objectives, so that combination is refused."""
    from cxr.errors import UserError
    from cxr.training.scoring import Yardstick
    from cxr.tuning.storage import make_yardstick

    cfg = Config().override({"tune.objective_copies": 3})
    assert make_yardstick(cfg) == Yardstick(cfg.train.augment, 3, cfg.project.seed)
    assert make_yardstick(cfg.override({"tune.objective": "val_auroc"})) is None
    with pytest.raises(UserError, match="tune.objective=augmented_val_auroc"):
        make_yardstick(
            cfg.override({"tune.objective": "val_auroc", "train.early_stopping.monitor": "augmented_val_auroc"})
        )


def test_a_swallowed_ctrl_c_is_remembered_and_the_old_handler_restored():
    """`cxr tune` keeps a Ctrl-C even when its KeyboardInterrupt lands in a finaliser that Python ignores (seen in
    CI): the event stays set, so the trial stops at its next epoch and the study before its next trial."""
    import os
    import signal

    from cxr.tuning.interrupt import remembered_interrupt

    before = signal.getsignal(signal.SIGINT)
    with remembered_interrupt() as interrupted:
        assert not interrupted.is_set()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes of the main thread
                pass
        except KeyboardInterrupt:
            pass  # what a finaliser would have swallowed
        assert interrupted.is_set()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_ctrl_c_inside_a_finaliser_is_remembered_without_a_traceback_and_other_errors_still_reported(monkeypatch):
    """The CI case itself: SIGINT arrives while a weakref callback runs. Python cannot raise from there and hands
    the KeyboardInterrupt to sys.unraisablehook (which prints a traceback); `cxr tune` has remembered it, so it is
    dropped, while an unrelated error in a finaliser still reaches the hook that was there before."""
    import os
    import signal
    import sys
    import weakref

    from cxr.tuning.interrupt import remembered_interrupt

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: reported.append(unraisable.exc_type))

    class Mapped:
        pass

    def callback_hit_by_ctrl_c(ref):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100_000):  # the handler runs between bytecodes, inside this callback
            pass

    def callback_with_a_bug(ref):
        raise ValueError("a real finaliser bug")

    with remembered_interrupt() as interrupted:
        obj = Mapped()
        ref = weakref.ref(obj, callback_hit_by_ctrl_c)
        del obj  # CPython runs the callback now; its KeyboardInterrupt cannot propagate
        assert interrupted.is_set() and ref() is None
        assert reported == []

        obj = Mapped()
        ref = weakref.ref(obj, callback_with_a_bug)
        del obj
        assert reported == [ValueError]

    obj = Mapped()
    ref = weakref.ref(obj, callback_with_a_bug)
    del obj
    assert reported == [ValueError, ValueError]  # the hook is restored
