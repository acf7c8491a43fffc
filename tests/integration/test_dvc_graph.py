"""dvc.yaml cannot go stale: each stage's deps cover the code it runs, and its params every config key it reads.

Both are derived from the code (see tests/support/dvc_graph.py), not listed here: the code is the import closure of
the library function behind the stage's ``cxr <command>``; the keys are those read while that function runs on a
tiny synthetic project (:func:`cxr.config.record_reads`), once per variant in ``VARIANTS``.
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
from pathlib import Path

import pytest

from cxr.config import load_config, record_reads
from support.dvc_graph import (
    EXEMPT_SECTIONS,
    REPO,
    dep_covers,
    load_dvc_yaml,
    module_file,
    param_covers,
    param_entries,
    stage_code,
    stage_entry,
    uncovered,
)

STAGES = load_dvc_yaml()["stages"]

TINY = {
    "data.synthetic.n_patients": 30,  # fewer leave a validation split with one class
    "data.synthetic.size": 64,
    "prepare.sizes": [32],
    "prepare.workers": 1,  # in this process, where reads are recorded (prepare's workers get plain values anyway)
    "model.image_size": 32,
    "model.width": 8,
    "train.epochs": 1,
    "train.batch_size": 16,
    "evaluate.threshold_augmented_copies": 2,
    "evaluate.bootstrap": 20,
    "tune.objective_copies": 2,
    "mlflow.enabled": False,
}
# A key read only on some path is seen only when that path runs: one variant per path that reads other keys.
VARIANTS = {
    "params.yaml": {},
    "branches": {  # the yardstick (tune.objective_copies), test-time views (model.tta_*), an ensemble
        "train.early_stopping.monitor": "augmented_val_auroc",
        "model.tta_views": 2,
        "train.ensemble": 2,
        "evaluate.threshold": "sensitivity",
    },
    "linear": {"model.arch": "logistic_regression"},  # the baseline's own fitting path
}


@pytest.fixture(scope="module")
def code() -> dict[str, set[str]]:
    return stage_code(STAGES)


def test_deps_cover_the_code_each_stage_runs(code):
    assert all(code.values())
    problems = uncovered(STAGES, code)
    assert not problems, "dvc.yaml is out of step with the code:\n" + "\n".join(problems)


def test_a_missing_dep_is_reported(code):
    for name, stage in STAGES.items():
        for file in sorted(code[name]):
            cut = copy.deepcopy(STAGES)
            cut[name]["deps"] = [d for d in stage["deps"] if not dep_covers(str(d), file)]
            assert f"stage {name} runs {file} but no dep covers it" in uncovered(cut, code)
    cut = copy.deepcopy(STAGES)
    cut["train"]["deps"].append("src/cxr/no_such_module.py")
    assert "stage train depends on src/cxr/no_such_module.py, which does not exist" in uncovered(cut, code)


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Stage -> config keys read, and stage -> src files of the cxr modules first imported while it ran."""
    import torch

    reads: dict[str, set[str]] = {name: set() for name in STAGES}
    loaded: dict[str, set[str]] = {name: set() for name in STAGES}
    functions = {}
    for name, stage in STAGES.items():
        module, function = stage_entry(stage["cmd"])
        functions[name] = getattr(importlib.import_module(module), function)
    root, cwd, threads = tmp_path_factory.mktemp("dvcgraph"), Path.cwd(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for variant, overrides in VARIANTS.items():
            work = root / variant
            work.mkdir()
            os.chdir(work)  # anything a stage writes outside paths.* lands here
            paths = {f"paths.{p}": str(work / p) for p in ("raw", "prepared", "model", "reports")}
            cfg = load_config(REPO / "params.yaml", {**TINY, **overrides, **paths})
            for name in STAGES:  # dvc.yaml lists the stages in the order they run
                before = set(sys.modules)
                with record_reads() as keys:
                    functions[name](cfg)
                reads[name] |= keys
                loaded[name] |= {
                    module_file(m).as_posix() for m in set(sys.modules) - before if m.split(".")[0] == "cxr"
                }
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return reads, loaded


@pytest.mark.slow
def test_params_cover_every_key_each_stage_reads(code, observed):
    reads, loaded = observed
    for name, keys in reads.items():  # the recorder saw the stage at work
        assert {k for k in keys if k.split(".")[0] not in EXEMPT_SECTIONS}, f"stage {name} read no config key"
    ran = {name: code[name] | loaded[name] for name in STAGES}  # modules imported by a name built at run time too
    problems = uncovered(STAGES, ran, reads)
    assert not problems, "dvc.yaml is out of step with the code:\n" + "\n".join(problems)


@pytest.mark.slow
def test_a_missing_param_is_reported(code, observed):
    reads, _ = observed
    for name, stage in STAGES.items():
        for key in sorted(k for k in reads[name] if k.split(".")[0] not in EXEMPT_SECTIONS):
            cut = copy.deepcopy(STAGES)
            cut[name]["params"] = [p for p in param_entries(stage) if not param_covers(p, key)]
            assert f"stage {name} reads {key} but its params do not cover it" in uncovered(cut, code, reads)
