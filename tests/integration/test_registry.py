"""The registry through the real CLI: register with lineage, gated promotion, forced promotion, rollback, history."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from cxr.config import load_config
from cxr.tracking.registry import Decision, compare
from cxr.tracking.runs import use_store

pytestmark = pytest.mark.slow

TINY = [
    "data.synthetic.n_patients=60",
    "data.synthetic.size=96",
    "data.synthetic.difficulty=0.2",
    "prepare.sizes=[32]",
    "model.image_size=32",
    "model.width=8",
    "train.batch_size=16",
    "evaluate.bootstrap=50",
    "prepare.workers=1",
]
MODEL_A = ["model.arch=logistic_regression", "paths.model=models/a"]
MODEL_B = ["train.epochs=3", "train.lr=0.01", "paths.model=models/b"]


def cxr(workdir: Path, *argv: str, extra: list[str] = (), check: bool = True) -> subprocess.CompletedProcess:
    sets = [a for o in [*TINY, *extra] for a in ("-s", o)]
    res = subprocess.run(
        [sys.executable, "-m", "cxr", *argv, *sets], cwd=workdir, capture_output=True, text=True, timeout=600
    )
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("registry")
    cxr(work, "ingest")
    cxr(work, "prepare")
    for model in (MODEL_A, MODEL_B):
        cxr(work, "train", extra=model)
        cxr(work, "evaluate", extra=model)
    return work


def versions(project: Path) -> dict[str, dict]:
    cfg = load_config(overrides=TINY)
    use_store(f"sqlite:///{project / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    model = client.get_registered_model(cfg.mlflow.registered_model)
    out = {
        str(v.version): {"tags": v.tags, "aliases": []} for v in client.search_model_versions(f"name='{model.name}'")
    }
    for alias, v in model.aliases.items():
        out[str(v)]["aliases"].append(alias)
    return out


def test_register_gate_force_and_rollback(project: Path):
    run_a = json.loads((project / "models/a/model.json").read_text())["training"]["run_id"]
    cxr(project, "register", extra=MODEL_A)  # v1 from paths.model's own run
    cxr(project, "register", extra=MODEL_B)  # v2
    v = versions(project)
    assert set(v) == {"1", "2"}
    assert v["1"]["tags"]["run_id"] == run_a
    for tag in ("git_commit", "dataset_hash", "val_auroc", "test_auroc", "test_accuracy", "threshold"):
        assert v["1"]["tags"][tag], tag
    assert v["1"]["tags"]["dataset_hash"] == v["2"]["tags"]["dataset_hash"]
    auc = {k: float(v[k]["tags"]["val_auroc"]) for k in ("1", "2")}
    assert auc["1"] != auc["2"], "fixture precondition: two models with different validation AUROC"
    worse, better = sorted(auc, key=auc.get)
    worse_run = v[worse]["tags"]["run_id"]

    cxr(project, "promote", worse)  # no champion yet: accepted
    res = cxr(project, "promote", better)  # better: accepted
    assert "beats" in res.stderr
    assert versions(project)[better]["aliases"] == ["champion"]

    cxr(project, "register", "--run-id", worse_run)  # v3: the worse model again
    res = cxr(project, "promote", "3", check=False)
    assert res.returncode == 2 and "does not beat" in res.stderr and "--force" in res.stderr
    assert versions(project)[better]["aliases"] == ["champion"]  # unchanged

    cxr(project, "promote", "3", "--force", "--reason", "clinical sign-off for a site-specific model")
    assert versions(project)["3"]["aliases"] == ["champion"]

    cxr(project, "rollback")
    assert versions(project)[better]["aliases"] == ["champion"]
    cxr(project, "rollback")
    assert versions(project)[worse]["aliases"] == ["champion"]
    res = cxr(project, "rollback", check=False)
    assert res.returncode == 2 and "first" in res.stderr

    from cxr.tracking.registry import history

    cfg = load_config(overrides=[*TINY, f"mlflow.tracking_uri=sqlite:///{project / 'mlflow.db'}"])
    events = history(cfg)
    assert [(e["action"], e["from"], e["to"]) for e in events] == [
        ("promote", None, worse),
        ("promote", worse, better),
        ("promote", better, "3"),
        ("rollback", "3", better),
        ("rollback", better, worse),
    ]
    assert "forced" in events[2]["why"] and "clinical sign-off" in events[2]["why"]
    assert all(e["who"] and e["when"] for e in events)

    listing = cxr(project, "models").stdout
    assert "champion" in listing and "val_auroc" in listing


class FakeVersion:
    def __init__(self, version: str, auc: float | None, data: str = "d1") -> None:
        self.version, self.tags = version, {"dataset_hash": data}
        if auc is not None:
            self.tags["val_auroc"] = str(auc)


@pytest.mark.parametrize(
    ("candidate", "champion", "margin", "promote", "words"),
    [
        (FakeVersion("2", 0.9), None, 0.0, True, "no current champion"),
        (FakeVersion("2", 0.91), FakeVersion("1", 0.90), 0.0, True, "beats"),
        (FakeVersion("2", 0.91), FakeVersion("1", 0.90), 0.02, False, "margin"),
        (FakeVersion("2", 0.90), FakeVersion("1", 0.90), 0.0, False, "does not beat"),
        (FakeVersion("2", 0.99, data="d2"), FakeVersion("1", 0.90), 0.0, False, "not comparable"),
        (FakeVersion("2", None), FakeVersion("1", 0.90), 0.0, False, "missing"),
        (FakeVersion("1", 0.9), FakeVersion("1", 0.9), 0.0, False, "already"),
    ],
)
def test_promotion_gate(candidate, champion, margin, promote, words):
    decision = compare(candidate, champion, margin)
    assert isinstance(decision, Decision) and decision.promote is promote and words in decision.reason
