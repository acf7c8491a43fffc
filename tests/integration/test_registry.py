"""The registry through the real CLI: register with lineage and the evaluation it came with, the promotion gate
(each refusal names its rule; ``--force --reason`` overrides on the record), rollback, history, the model card."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

from cxr.cli import app
from cxr.config import load_config
from cxr.models.onnx_runtime import ONNX_FILE
from cxr.tracking.onnx_artifacts import ONNX_TAG
from cxr.tracking.registry import MIN_SCORE_STD, Decision, Rule, compare, history
from cxr.tracking.runs import use_store
from cxr.tracking.uris import load_predictor, local_model_dir
from support.cli import cxr_here

pytestmark = pytest.mark.slow

TINY = [
    "data.synthetic.n_patients=120",
    "data.synthetic.size=96",
    "data.synthetic.difficulty=0.0",  # obvious findings: the baselines rank validation cases clearly above chance
    "prepare.sizes=[32,64]",
    "model.image_size=32",
    "model.arch=logistic_regression",  # seconds to fit and, unlike a few CNN epochs on tiny data, not degenerate
    "evaluate.bootstrap=50",
    "prepare.workers=1",
]
MODEL_A = ["paths.model=models/a"]
MODEL_B = ["model.image_size=64", "paths.model=models/b"]  # same prepared data, another validation AUROC
UNEVALUATED = "cxr-unevaluated"  # model A, registered before `cxr evaluate` ran on it


def cxr(workdir: Path, *argv: str, extra: list[str] = (), check: bool = True) -> subprocess.CompletedProcess:
    return cxr_here(workdir, *argv, overrides=[*TINY, *extra], check=check)


def cli(project: Path, monkeypatch, name: str, *argv: str):
    """The same CLI in this process (faster than a subprocess), on registered model ``name``."""
    monkeypatch.chdir(project)
    sets = [a for o in [*TINY, f"mlflow.registered_model={name}"] for a in ("-s", o)]
    return CliRunner().invoke(app, [*argv, *sets])


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("registry")
    cxr(work, "ingest")
    cxr(work, "prepare")
    cxr(work, "train", extra=MODEL_A)
    cxr(work, "register", extra=[*MODEL_A, f"mlflow.registered_model={UNEVALUATED}"])  # before evaluating it
    cxr(work, "evaluate", extra=MODEL_A)
    cxr(work, "train", extra=MODEL_B)
    cxr(work, "evaluate", extra=MODEL_B)
    return work


def client(project: Path) -> mlflow.MlflowClient:
    use_store(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.MlflowClient()


def versions(project: Path, name: str = "cxr") -> dict[str, dict]:
    c = client(project)
    model = c.get_registered_model(name)
    out = {
        str(v.version): {"tags": v.tags, "aliases": [], "description": v.description}
        for v in c.search_model_versions(f"name='{model.name}'")
    }
    for alias, v in model.aliases.items():
        out[str(v)]["aliases"].append(alias)
    return out


def events(project: Path, name: str = "cxr") -> list[dict]:
    return history(
        load_config(overrides=[f"mlflow.tracking_uri=sqlite:///{project / 'mlflow.db'}"]).override(
            {"mlflow.registered_model": name}
        )
    )


def run_of(project: Path, model: str) -> str:
    return json.loads((project / "models" / model / "model.json").read_text())["training"]["run_id"]


def evaluation_of(project: Path, run_id: str) -> dict:
    client(project)
    return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/evaluation/evaluation.json"))


def table(text: str) -> list[dict[str, str]]:
    """The rows of a rich table printed by `cxr models`, as {column: cell} (first line of each row)."""
    lines = [line for line in text.splitlines() if line.startswith(("┃", "│"))]
    cells = [[c.strip() for c in line.strip("┃│").split("┃" if line[0] == "┃" else "│")] for line in lines]
    header, rows = cells[0], cells[1:]
    return [dict(zip(header, row, strict=True)) for row in rows if row[0]]  # continuation lines have no id


def test_register_gate_force_and_rollback(project: Path):
    run_a = run_of(project, "a")
    cxr(project, "register", extra=MODEL_A)  # v1 from paths.model's own run
    cxr(project, "register", extra=MODEL_B)  # v2
    v = versions(project)
    assert set(v) == {"1", "2"}
    assert v["1"]["tags"]["run_id"] == run_a
    for tag in ("git_commit", "dataset_hash", "val_auroc", "test_auroc", "test_accuracy", "threshold"):
        assert v["1"]["tags"][tag], tag
    # registration records the evaluation it came with: the numbers the gate judges
    val = evaluation_of(project, run_a)["splits"]["val"]
    assert v["1"]["tags"]["evaluated"] == "true"
    assert v["1"]["tags"]["eval_dataset_hash"] == v["1"]["tags"]["dataset_hash"]
    for tag, value in [
        ("val_auroc", val["auroc"]["value"]),
        ("val_auroc_ci_low", val["auroc"]["ci_low"]),
        ("val_auroc_ci_high", val["auroc"]["ci_high"]),
        ("val_score_std", val["scores"]["std"]),
        ("val_positive_share", val["scores"]["predicted_positive_share"]),
    ]:
        assert float(v["1"]["tags"][tag]) == pytest.approx(value, abs=1e-6), tag
    assert v["1"]["tags"]["dataset_hash"] == v["2"]["tags"]["dataset_hash"]
    auc = {k: float(v[k]["tags"]["val_auroc"]) for k in ("1", "2")}
    assert auc["1"] != auc["2"], "fixture precondition: two models with different validation AUROC"
    worse, better = sorted(auc, key=auc.get)
    worse_run = v[worse]["tags"]["run_id"]

    cxr(project, "promote", worse)  # no champion yet, and a healthy evaluated model: accepted
    res = cxr(project, "promote", better)  # better: accepted
    assert "beats" in res.stderr
    assert versions(project)[better]["aliases"] == ["champion"]
    # `dvc metrics show` lists the champion's own evaluation beside the pipeline model's metrics.json
    champion = json.loads((project / "reports" / "champion.json").read_text())
    tested = evaluation_of(project, v[better]["tags"]["run_id"])["splits"]["test"]
    assert (champion["version"], champion["run_id"]) == (int(better), v[better]["tags"]["run_id"])
    assert champion["test"]["auroc"] == pytest.approx(tested["auroc"]["value"])

    # v3: the worse model again (another run with the same model: the same run would return its version)
    cxr(project, "register", "--run-id", crafted_run(project, worse_run, _unchanged))
    res = cxr(project, "promote", "3", check=False)
    assert res.returncode == 2 and "does not beat" in res.stderr and "--force" in res.stderr
    assert f"(rule {Rule.NOT_BETTER})" in res.stderr
    assert versions(project)[better]["aliases"] == ["champion"]  # unchanged

    cxr(project, "promote", "3", "--force", "--reason", "clinical sign-off for a site-specific model")
    assert versions(project)["3"]["aliases"] == ["champion"]

    cxr(project, "rollback")
    assert versions(project)[better]["aliases"] == ["champion"]
    cxr(project, "rollback")
    assert versions(project)[worse]["aliases"] == ["champion"]
    res = cxr(project, "rollback", check=False)
    assert res.returncode == 2 and "first" in res.stderr
    assert json.loads((project / "reports" / "champion.json").read_text())["version"] == int(worse)

    found = events(project)
    assert [(e["action"], e["from"], e["to"]) for e in found] == [
        ("promote", None, worse),
        ("promote", worse, better),
        ("promote", better, "3"),
        ("rollback", "3", better),
        ("rollback", better, worse),
    ]
    assert "forced" in found[2]["why"] and "clinical sign-off" in found[2]["why"]
    assert [e.get("forced") for e in found] == [False, False, True, None, None]
    assert found[2]["overrode"] == Rule.NOT_BETTER
    assert all(e["who"] and e["when"] for e in found)

    listing = table(cxr(project, "models").stdout)
    assert {r["version"]: r["aliases"] for r in listing}[worse] == "champion"
    assert all(r["evaluated"] == "true" and r["val_auroc"] and r["val_auroc_ci"] for r in listing)


def test_history_columns_show_their_own_fields(project: Path, monkeypatch):
    """Promote and rollback records have different keys: each column shows its own field, blank where absent."""
    name = "history-columns"
    run_a = run_of(project, "a")
    for run in (run_a, crafted_run(project, run_a, _unchanged)):  # v2 does not beat v1: promoting it takes --force
        assert cli(project, monkeypatch, name, "register", "--run-id", run).exit_code == 0
    assert cli(project, monkeypatch, name, "promote", "1").exit_code == 0
    assert cli(project, monkeypatch, name, "promote", "2", "--force", "--reason", "columns test").exit_code == 0
    assert cli(project, monkeypatch, name, "rollback").exit_code == 0

    res = cli(project, monkeypatch, name, "models", "--history")
    assert res.exit_code == 0, res.output
    rows = table(res.stdout)
    assert [(r["action"], r["from"], r["to"], r["forced"], r["undoes"]) for r in rows] == [
        ("promote", "", "1", "False", ""),
        ("promote", "1", "2", "True", ""),
        ("rollback", "2", "1", "", rows[1]["id"]),
    ]
    assert [r["overrode"] for r in rows] == ["", Rule.NOT_BETTER, ""]
    assert [r["id"] for r in rows] == sorted({r["id"] for r in rows})  # unique, and time-ordered as listed


def _unchanged(card: dict, evaluation: dict) -> None:  # another run with the same model and evaluation
    pass


def test_registering_the_same_evaluated_run_twice_keeps_one_version(project: Path, monkeypatch):
    """A re-run (a second `make demo`, a retried script) finds its version instead of adding a duplicate."""
    name = "idempotent"
    for _ in range(2):
        res = cli(project, monkeypatch, name, "register", "--run-id", run_of(project, "a"))
        assert res.exit_code == 0 and "version 1 from run" in res.stderr, res.output
    assert "already is idempotent version 1" in res.stderr
    assert list(versions(project, name)) == ["1"]


def _near_constant(card: dict, evaluation: dict) -> None:  # every patient gets 0.41 +- a hair
    evaluation["splits"]["val"]["scores"]["std"] = MIN_SCORE_STD / 5


def _single_class(card: dict, evaluation: dict) -> None:  # every validation image called positive
    evaluation["splits"]["val"]["scores"].update(distinct_predictions=1, predicted_positive_share=1.0)


def _ci_includes_chance(card: dict, evaluation: dict) -> None:  # a small validation set: a wide interval
    evaluation["splits"]["val"]["auroc"].update(ci_low=0.45, ci_high=0.97)


def _other_data(card: dict, evaluation: dict) -> None:  # trained, validated and evaluated on other prepared data
    card["training"]["dataset_hash"] = evaluation["data"]["dataset_hash"] = "f" * 64


def crafted_run(project: Path, base_run: str, change: Callable[[dict, dict], None]) -> str:
    """A run as `cxr register` reads one (logged model, card, evaluation), copied from ``base_run`` and changed."""
    c = client(project)
    base = c.get_run(base_run)
    card = json.loads(mlflow.artifacts.load_text(f"runs:/{base_run}/model_info.json"))
    evaluation = evaluation_of(project, base_run)
    change(card, evaluation)
    run = c.create_run(base.info.experiment_id, tags={"model_uri": base.data.tags["model_uri"]}, run_name="crafted")
    c.log_text(run.info.run_id, json.dumps(card), "model_info.json")
    c.log_text(run.info.run_id, json.dumps(evaluation), "evaluation/evaluation.json")
    c.set_terminated(run.info.run_id)
    return run.info.run_id


def refused_then_forced(project: Path, monkeypatch, name: str, version: str, rule: Rule) -> None:
    """The gate refuses ``version`` in one line naming ``rule``; --force --reason promotes it, on the record."""
    res = cli(project, monkeypatch, name, "promote", version)
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(errors) == 1, res.output
    assert f"(rule {rule})" in errors[0] and "--force --reason" in errors[0], errors[0]
    assert "champion" not in versions(project, name)[version]["aliases"]

    res = cli(project, monkeypatch, name, "promote", version, "--force", "--reason", "audit: signed off by Dr X")
    assert res.exit_code == 0, res.output
    assert versions(project, name)[version]["aliases"] == ["champion"]
    last = events(project, name)[-1]
    assert (last["to"], last["forced"], last["overrode"]) == (version, True, rule)
    assert "signed off by Dr X" in last["why"] and rule in last["why"]


def test_never_evaluated_is_refused(project: Path, monkeypatch):
    """Registered before `cxr evaluate`: the version keeps the (missing) evaluation it came with."""
    v = versions(project, UNEVALUATED)["1"]
    assert v["tags"]["evaluated"] == "false" and "val_auroc_ci_low" not in v["tags"]
    assert "**Not evaluated**" in v["description"] and "never evaluated" in v["description"]
    res = cli(project, monkeypatch, UNEVALUATED, "promote", "1", "--force")
    assert res.exit_code == 2 and "--force needs --reason" in res.stderr
    refused_then_forced(project, monkeypatch, UNEVALUATED, "1", Rule.NEVER_EVALUATED)


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        (_near_constant, Rule.NEAR_CONSTANT),
        (_single_class, Rule.SINGLE_CLASS),
        (_ci_includes_chance, Rule.CHANCE),
        (_other_data, Rule.OTHER_DATA),
    ],
    ids=lambda x: getattr(x, "__name__", str(x)),
)
def test_each_gate_rule_refuses_and_force_overrides_on_the_record(project: Path, monkeypatch, change, rule):
    name = f"gate-{rule}"
    run_a = run_of(project, "a")
    assert cli(project, monkeypatch, name, "register", "--run-id", run_a).exit_code == 0
    assert cli(project, monkeypatch, name, "promote", "1").exit_code == 0  # a healthy champion to compare with
    res = cli(project, monkeypatch, name, "register", "--run-id", crafted_run(project, run_a, change))
    assert res.exit_code == 0 and "version 2 from run" in res.stderr, res.output
    if rule is not Rule.OTHER_DATA:  # a rule on the version alone: registration warns and its card says so
        assert f"the gate will refuse it (rule {rule})" in res.stderr
        assert f"- promotion gate: rule {rule}: " in versions(project, name)["2"]["description"]
    refused_then_forced(project, monkeypatch, name, "2", rule)


def test_a_version_without_an_out_of_distribution_check_is_warned_about_or_refused(project: Path, monkeypatch):
    """The linear baseline has no check: its version says so, promote warns, and with registry.require_ood refuses."""
    name = "no-ood"
    assert cli(project, monkeypatch, name, "register", "--run-id", run_of(project, "a")).exit_code == 0
    v = versions(project, name)["1"]
    assert v["tags"]["ood_method"] == "none" and "| Out-of-distribution check | none" in v["description"]
    sets = [a for o in [*TINY, f"mlflow.registered_model={name}", "registry.require_ood=true"] for a in ("-s", o)]
    res = CliRunner().invoke(app, ["promote", "1", *sets])
    assert res.exit_code == 2 and f"(rule {Rule.NO_OOD_CHECK})" in res.stderr and "--force" in res.stderr
    res = cli(project, monkeypatch, name, "promote", "1")
    assert res.exit_code == 0 and "no out-of-distribution check" in res.stderr
    assert versions(project, name)["1"]["aliases"] == ["champion"]


def test_the_version_description_is_a_model_card(project: Path, monkeypatch):
    run_a = run_of(project, "a")
    assert cli(project, monkeypatch, "card", "register", "--run-id", run_a).exit_code == 0
    v = versions(project, "card")["1"]
    card = json.loads((project / "models" / "a" / "model.json").read_text())
    splits = evaluation_of(project, run_a)["splits"]
    described = v["description"]

    def with_ci(entry: dict) -> str:
        return f"{entry['value']:.4f} ({entry['ci_low']:.4f}-{entry['ci_high']:.4f})"

    for line in [
        "## Model card: card v1",
        "| Data source | synthetic |",
        f"| Dataset hash | `{card['training']['dataset_hash']}` |",
        "| Synthetic data | yes |",
        "| Architecture | logistic_regression (binary: normal, pneumonia) |",
        f"| Threshold | {card['threshold']:.4f} (rule: {card['threshold_method']}, chosen on validation",
        "| metric | val | test |",
        f"| AUROC | {with_ci(splits['val']['auroc'])} | {with_ci(splits['test']['auroc'])} |",
        f"| sensitivity | {with_ci(splits['val']['sensitivity'])} | {with_ci(splits['test']['sensitivity'])} |",
        "**Intended use.**",
        "- synthetic data: no clinical meaning",
    ]:
        assert line in described, line
    assert "promotion gate:" not in described  # a healthy model: no gate finding among its limits
    assert v["tags"]["run_id"] == run_a and v["tags"]["evaluated"] == "true"  # the tags stay beside it


HEALTHY = {
    "evaluated": "true",
    "val_score_std": "0.3",
    "val_distinct_predictions": "2",
    "val_auroc_ci_low": "0.8",
    "val_auroc_ci_high": "0.95",
}


class FakeVersion:
    def __init__(self, version: str, auc: float | None, data: str = "d1", **tags: str) -> None:
        self.version = version
        self.tags = {**HEALTHY, "dataset_hash": data, "eval_dataset_hash": data, **tags}
        if auc is not None:
            self.tags["val_auroc"] = str(auc)


@pytest.mark.parametrize(
    ("candidate", "champion", "margin", "promote", "rule", "words"),
    [
        (FakeVersion("2", 0.9), None, 0.0, True, None, "no current champion"),
        (FakeVersion("2", 0.91), FakeVersion("1", 0.90), 0.0, True, None, "beats"),
        (FakeVersion("2", 0.91), FakeVersion("1", 0.90), 0.02, False, Rule.NOT_BETTER, "margin"),
        (FakeVersion("2", 0.90), FakeVersion("1", 0.90), 0.0, False, Rule.NOT_BETTER, "does not beat"),
        (FakeVersion("2", 0.99, data="d2"), FakeVersion("1", 0.90), 0.0, False, Rule.OTHER_DATA, "not comparable"),
        (FakeVersion("2", None), FakeVersion("1", 0.90), 0.0, False, Rule.CHANCE, "no validation AUROC"),
        (FakeVersion("1", 0.9), FakeVersion("1", 0.9), 0.0, False, Rule.ALREADY_CHAMPION, "already"),
        (FakeVersion("2", 0.9, evaluated="false"), None, 0.0, False, Rule.NEVER_EVALUATED, "without an evaluation"),
        (FakeVersion("2", 0.9, eval_dataset_hash="d9"), None, 0.0, False, Rule.NEVER_EVALUATED, "evaluated on data"),
        (FakeVersion("2", 0.9, val_score_std="0.001"), None, 0.0, False, Rule.NEAR_CONSTANT, "near-constant"),
        (FakeVersion("2", 0.9, val_distinct_predictions="1"), None, 0.0, False, Rule.SINGLE_CLASS, "same prediction"),
        (FakeVersion("2", 0.6, val_auroc_ci_low="0.49"), None, 0.0, False, Rule.CHANCE, "chance"),
        (
            FakeVersion("2", 0.3, val_auroc_ci_low="0.1", val_auroc_ci_high="0.45"),
            None,
            0,
            False,
            Rule.CHANCE,
            "chance",
        ),
        (FakeVersion("2", 0.9, val_score_std=""), None, 0.0, False, Rule.NEAR_CONSTANT, "no validation scores"),
    ],
)
def test_promotion_gate(candidate, champion, margin, promote, rule, words):
    decision = compare(candidate, champion, margin)
    assert isinstance(decision, Decision) and decision.promote is promote and words in decision.reason
    assert decision.rule == rule


def test_a_version_carries_its_onnx_graph(project: Path, monkeypatch):
    """`cxr register` exports the graph into the version's artifacts (once: a second registration finds it) and tags
    its hash; the version then loads in the ONNX runtime."""
    name = "with-onnx"
    for _ in range(2):
        assert cli(project, monkeypatch, name, "register", "--run-id", run_of(project, "a")).exit_code == 0
    tags = versions(project, name)["1"]["tags"]
    stored = local_model_dir(f"models:/{name}/1")
    card = json.loads((stored / "model.json").read_text())
    assert (stored / ONNX_FILE).exists() and tags[ONNX_TAG] == card["onnx_sha256"]
    assert load_predictor(f"models:/{name}/1", runtime="onnx").card.onnx_sha256 == tags[ONNX_TAG]
    # `cxr export` of a registered version: a copy with its graph beside paths.model, named after the version
    assert cli(project, monkeypatch, name, "export", "--model", f"models:/{name}/1").exit_code == 0
    assert (project / "models" / f"{name}-v1" / ONNX_FILE).exists()
