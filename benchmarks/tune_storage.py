"""How many trials per second one Optuna storage sustains for `cxr tune` workers, with the training taken out.

    python benchmarks/tune_storage.py                        # a throwaway PostgreSQL; 1, 2, 4 and 8 workers, 300 trials each
    python benchmarks/tune_storage.py --storage postgresql://user@host/db --workers 1,4,16

Each worker is a process doing what a `cxr tune` worker does to the storage, with no training in between: cxr's
own storage (heartbeats on), study (multivariate TPE with constant liar, the median pruner) and search space
(params.yaml's tune.space); per trial it suggests the parameters, reads the study's trials (the quota check),
and reports one value and asks the pruner at each of `train.epochs` epochs. All workers share one fresh study
per arm; trials/s = finished trials / wall time. The storage's load per trial grows with the study (TPE reads
every trial), so the figure for the last quarter of the trials is reported beside the overall one.
A real trial trains for minutes, so the storage holds about (trials/s) x (seconds per trial) workers.
Server, clients and TPE share this machine's cores: on a separate database server the figure is higher.
Writes benchmarks/results/tune_storage.json.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna

from common import write_result
from cxr.config import load_config
from cxr.tuning.space import suggest
from cxr.tuning.storage import load_study, make_storage
from support.postgres import throwaway_postgres


def _value(params: dict, epoch: int, rng: np.random.Generator) -> float:
    """A learning-curve-like objective: rises with the epoch, depends on lr, plus noise."""
    lr = float(params.get("train.lr", 1e-3))
    return 0.9 - 0.3 * abs(np.log10(lr) + 2.5) / 2 - 0.2 / (epoch + 1) + rng.normal(0, 0.01)


def _worker(url: str, study_name: str, n_trials: int, start: mp.Event) -> None:
    cfg = load_config()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = load_study(cfg, study_name, make_storage(cfg, url), shared=True)
    rng = np.random.default_rng()

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, cfg.tune.space)
        trial.study.get_trials(deepcopy=False)  # cxr's quota check before training
        value = 0.0
        for epoch in range(cfg.train.epochs):
            value = _value(params, epoch, rng)
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    start.wait()
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # as cxr's quota counts
    study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=finished)])


def _arm(url: str, workers: int, n_trials: int) -> dict:
    name = f"storage-bench-{workers}w-{time.time_ns()}"
    cfg = load_config()
    load_study(cfg, name, make_storage(cfg, url), shared=True)  # created once, before the workers race
    start = mp.Event()
    procs = [mp.Process(target=_worker, args=(url, name, n_trials, start)) for _ in range(workers)]
    for p in procs:
        p.start()
    time.sleep(5)  # imports and connections, outside the timed part
    began = time.perf_counter()
    start.set()
    for p in procs:
        p.join()
    wall = time.perf_counter() - began
    trials = optuna.load_study(study_name=name, storage=make_storage(cfg, url)).get_trials(deepcopy=False)
    done = sorted(t.datetime_complete for t in trials if t.datetime_complete is not None)
    last = done[-(len(done) // 4) :]
    last_rate = (len(last) - 1) / max((last[-1] - last[0]).total_seconds(), 1e-9)
    states = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    return {
        "workers": workers,
        "finished": len(done),
        "wall_s": round(wall, 2),
        "trials_per_s": round(len(done) / wall, 2),
        "trials_per_s_last_quarter": round(last_rate, 2),
        "states": states,
        "epochs_reported_per_trial": cfg.train.epochs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", help="an existing storage URL (default: a throwaway local PostgreSQL)")
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--trials", type=int, default=300, help="finished (complete or pruned) trials per arm")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.storage:
            arms = [_arm(args.storage, w, args.trials) for w in counts]
        else:
            with throwaway_postgres(Path(tmp) / "pg", databases=("optuna",)) as server:
                arms = [_arm(f"{server}/optuna", w, args.trials) for w in counts]
    for arm in arms:
        print(
            f"{arm['workers']} workers: {arm['trials_per_s']} trials/s overall, "
            f"{arm['trials_per_s_last_quarter']} in the last quarter ({arm['states']})"
        )
    write_result(
        "tune_storage",
        {
            "storage": "given" if args.storage else "throwaway local PostgreSQL (server and workers share the cores)",
            "trials_per_arm": args.trials,
            "arms": arms,
            "best_trials_per_s": max(a["trials_per_s"] for a in arms),
            "summary": "; ".join(
                f"{a['workers']} workers {a['trials_per_s']} trials/s (last quarter {a['trials_per_s_last_quarter']})"
                for a in arms
            )
            + f" ({args.trials} trials, {arms[0]['epochs_reported_per_trial']} reports each)",
        },
    )


if __name__ == "__main__":
    main()
