"""ONNX: `cxr export` writes model.onnx beside the weights and records its hash; the ONNX runtime answers as torch
does (probabilities within 1e-4, the same OOD scores and spread), refuses a graph that is not the recorded one, and
the service runs it when asked. What the exporter would get wrong is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cxr.cli import app
from cxr.config import AugmentConfig, Config
from cxr.data.augment import draw_augment
from cxr.errors import UserError
from cxr.fsutil import sha256_file
from cxr.models import build_model
from cxr.models.linear import LinearBaseline
from cxr.models.onnx_export import TOLERANCE, export
from cxr.models.onnx_runtime import ONNX_FILE, OnnxPredictor, predictor_class
from cxr.models.predictor import CARD_FILE, WEIGHTS_FILE, BrokenModel, ModelLoadError, Predictor
from cxr.models.wrappers import Ensemble, TestTimeAugmentation
from cxr.serving import served as served_module
from cxr.serving.served import ServedModel, check_registered_weights
from cxr.tracking.onnx_artifacts import ONNX_TAG
from cxr.tracking.registry import WEIGHTS_TAG
from cxr.tracking.uris import ModelRef
from support.films import png
from support.tiny_model import tiny_card
from support.varied_model import predictor_with_ood, simple_cnn, synthetic_films, varied

SIZE = 32
OOD_RTOL = 1e-4  # the scores are rounded to 1e-4 and move by ~1e-4 of themselves with the batch (cxr.models.ood)


def one_network(path: Path) -> Path:
    films = synthetic_films(32, SIZE)
    return predictor_with_ood(varied(simple_cnn(), films), SIZE, films).save(path)


def an_ensemble(path: Path) -> Path:
    films = synthetic_films(32, SIZE)
    model = varied(Ensemble([simple_cnn(seed=1), simple_cnn(seed=2)]), films)
    return predictor_with_ood(model, SIZE, films).save(path)


def a_cross_size_ensemble(path: Path) -> Path:
    """simple_cnn on the whole film and an mlp on it resized to 16 px inside the graph, weighted 0.7 / 0.3."""
    films = synthetic_films(32, SIZE)
    torch.manual_seed(3)
    members = [simple_cnn(seed=1), build_model("mlp", 1, width=16, image_size=16)]
    model = varied(Ensemble(members, weights=[0.7, 0.3], input_sizes=[SIZE, 16]), films)
    return predictor_with_ood(model, SIZE, films).save(path)


def multiclass_fusion(path: Path) -> Path:
    films, tabular = synthetic_films(16, SIZE), torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    model = varied(simple_cnn(3, n_tabular=3), films, tabular)
    card = tiny_card(model.spec, SIZE, "multiclass", ("normal", "bacterial", "viral"))
    return Predictor(model, card).save(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """One exported network with an OOD check; tests that change it work on a copy."""
    path = one_network(tmp_path_factory.mktemp("onnx") / "model")
    export(path)
    return path


def copy_of(path: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(path, tmp_path / "copy"))


@pytest.mark.parametrize("make", [one_network, an_ensemble, a_cross_size_ensemble, multiclass_fusion])
def test_the_graph_answers_as_torch_does(make, tmp_path):
    path = make(tmp_path / "model")
    export(path)
    card = json.loads((path / CARD_FILE).read_text())
    assert card["onnx_sha256"] == sha256_file(path / ONNX_FILE)
    torch_p, onnx_p = Predictor.from_dir(path), OnnxPredictor.from_dir(path)
    films = np.concatenate([synthetic_films(12, SIZE, seed=7), 255 - synthetic_films(2, SIZE, seed=8)])
    tabular = np.random.default_rng(0).normal(size=(len(films), 3)).astype(np.float32) if torch_p.uses_tabular else None
    a, b = torch_p.score(films, tabular, batch_size=5), onnx_p.score(films, tabular, batch_size=5)
    assert np.ptp(a.probs) > 0.2, "precondition: answers that vary from film to film"
    assert np.max(np.abs(a.probs - b.probs)) <= TOLERANCE
    if a.ood is not None:
        np.testing.assert_allclose(b.ood, a.ood, rtol=OOD_RTOL)
        assert [torch_p.describe(p, **a.of(i))["prediction"] for i, p in enumerate(a.probs)] == [
            onnx_p.describe(p, **b.of(i))["prediction"] for i, p in enumerate(b.probs)
        ]
    assert (a.spread is None) == (b.spread is None)
    if a.spread is not None:
        assert np.max(np.abs(a.spread - b.spread)) <= TOLERANCE


def _flip_a_byte(path: Path) -> None:
    data = bytearray((path / ONNX_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / ONNX_FILE).write_bytes(bytes(data))


def _unrecord(path: Path) -> None:
    card = json.loads((path / CARD_FILE).read_text())
    del card["onnx_sha256"]
    (path / CARD_FILE).write_text(json.dumps(card))


def _other_weights_rehashed(path: Path) -> None:
    """New weights with a card that agrees with them: the graph left behind is of the old ones."""
    state = load_file(str(path / WEIGHTS_FILE))
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key] = -state[key]
    save_file(state, str(path / WEIGHTS_FILE))
    card = json.loads((path / CARD_FILE).read_text())
    card["weights_sha256"] = sha256_file(path / WEIGHTS_FILE)
    (path / CARD_FILE).write_text(json.dumps(card))


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda p: (p / ONNX_FILE).unlink(), ModelLoadError, "make it with `cxr export`"),
        (_flip_a_byte, BrokenModel, "not the graph this model was exported with"),
        (_unrecord, BrokenModel, "not recorded in the model's card"),
        (_other_weights_rehashed, BrokenModel, "exported from other weights"),
    ],
)
def test_a_graph_that_is_not_the_recorded_one_is_refused_in_one_line(exported, tmp_path, change, error, message):
    path = copy_of(exported, tmp_path)
    change(path)
    with pytest.raises(error, match=message) as err:
        OnnxPredictor.from_dir(path)
    assert "\n" not in str(err.value)


def test_saving_a_model_again_drops_the_graph_it_does_not_write(exported, tmp_path):
    again = Predictor.from_dir(exported).save(tmp_path / "again")
    assert "onnx_sha256" not in json.loads((again / CARD_FILE).read_text())


def test_the_onnx_runtime_runs_on_the_cpu_in_fp32_only(exported):
    with pytest.raises(UserError, match="CPU in fp32"):
        OnnxPredictor.from_dir(exported, precision="bf16")
    with pytest.raises(UserError, match="unknown runtime 'tensorrt'"):
        predictor_class("tensorrt")


def test_auto_serves_the_graph_where_it_can_and_torch_elsewhere(exported, tmp_path):
    without_graph = one_network(tmp_path / "no_graph")
    assert predictor_class("auto", exported) is OnnxPredictor
    assert predictor_class("auto", without_graph) is Predictor  # never exported: torch, not a refusal
    assert predictor_class("auto", exported, precision="bf16") is Predictor
    assert predictor_class("auto", exported, device="cuda") is Predictor
    assert ServedModel.load(Config(), exported, runtime="auto").metadata()["runtime"] == "onnx"


def _tta(path: Path) -> Path:
    model = TestTimeAugmentation(simple_cnn(), draw_augment(2, AugmentConfig(), torch.Generator().manual_seed(0)))
    return Predictor(model, tiny_card(model.spec, 32)).save(path)


def _baseline_at(size: int):
    return lambda path: Predictor(LinearBaseline(1), tiny_card(LinearBaseline(1).spec, size)).save(path)


@pytest.mark.parametrize(
    ("make", "message"),
    [(_tta, "test-time-augmentation model"), (_baseline_at(28), "logistic_regression baseline at 28 px")],
)
def test_cxr_export_refuses_what_it_cannot_export_faithfully_in_one_line(make, message, tmp_path, monkeypatch):
    path = make(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["export", "--model", str(path)])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (path / ONNX_FILE).exists()


def test_cxr_export_writes_the_graph_into_a_copy_at_out(tmp_path, monkeypatch):
    path = _baseline_at(32)(tmp_path / "model")  # the baseline exports where its pooling divides the input
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["export", "--model", str(path), "--out", "copy"])
    assert res.exit_code == 0, res.output
    assert not (path / ONNX_FILE).exists()
    assert OnnxPredictor.from_dir(tmp_path / "copy").card.onnx_sha256 == sha256_file(tmp_path / "copy" / ONNX_FILE)


def test_the_service_runs_the_graph_when_asked(exported):
    upload = png(synthetic_films(1, 96, seed=3)[0])
    by_runtime = {rt: ServedModel.load(Config(), exported, runtime=rt) for rt in ("torch", "onnx")}
    answers = {rt: served.predict([upload])[0] for rt, served in by_runtime.items()}
    prob = {rt: answer["probabilities"]["pneumonia"] for rt, answer in answers.items()}
    assert abs(prob["onnx"] - prob["torch"]) <= TOLERANCE
    assert answers["onnx"]["ood"]["score"] == pytest.approx(answers["torch"]["ood"]["score"], rel=OOD_RTOL)
    onnx = by_runtime["onnx"]
    assert onnx.metadata()["runtime"] == "onnx" and by_runtime["torch"].metadata()["runtime"] == "torch"
    assert ServedModel.without_weights(onnx.card()).metadata()["runtime"] == "onnx"  # the HTTP process says so too
    assert onnx.explain(upload)["png"]  # Grad-CAM still comes from the torch network


def test_a_registered_version_serves_only_the_graph_it_was_registered_with(exported, monkeypatch):
    card = Predictor.from_dir(exported).card
    registered = {WEIGHTS_TAG: card.weights_sha256, ONNX_TAG: card.onnx_sha256}
    monkeypatch.setattr(served_module, "registry_version", lambda uri: SimpleNamespace(tags=registered))
    ref = ModelRef("cxr", "1", "models:/cxr@champion")
    check_registered_weights(ref, card, "onnx")
    other = card.model_copy(update={"onnx_sha256": "0" * 64})
    with pytest.raises(BrokenModel, match="was registered with ONNX graph sha256"):
        check_registered_weights(ref, other, "onnx")
    check_registered_weights(ref, other, "torch")  # the torch runtime does not read the graph
