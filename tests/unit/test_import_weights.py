"""`cxr import-weights`: a TorchXRayVision checkpoint in, safetensors plus JSON out, loaded by model.weights=PATH;
a pickle that would run code, or holds any class but the expected ones, is refused with nothing executed."""

from __future__ import annotations

import json
import os
import sys
import types
import urllib.error
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.backends.thnn import _get_thnn_function_backend

from cxr.models import build_model
from cxr.models.import_weights import XRV_STD, import_weights
from cxr.models.networks import ModelError
from cxr.models.weights_info import read_info
from cxr.models.xrv_download import LABELS, download, labels_of
from support.cli import cxr_here

PATHOLOGIES = list(LABELS)


def _xrv_module() -> types.ModuleType:
    """A stand-in for the torchxrayvision package's models module (the package itself is not installed)."""

    class DenseNet(torchvision.models.DenseNet):  # 1-channel densenet121 with TorchXRayVision's extra attributes
        def __init__(self) -> None:
            super().__init__(32, (6, 12, 24, 16), 64, num_classes=len(PATHOLOGIES))
            self.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.pathologies = PATHOLOGIES
            self.apply_sigmoid = False
            self.register_buffer("op_threshs", torch.rand(len(PATHOLOGIES)))

    class Sneaky(nn.Module):  # a class of the same package that the conversion does not expect
        pass

    module = types.ModuleType("torchxrayvision.models")
    for cls in (DenseNet, Sneaky):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    return module


class _OldBackend:
    """What a module pickled by torch < 1.5 holds in ``_backend``: a call of a no-op kept for such files."""

    def __reduce__(self):
        return (_get_thnn_function_backend, ())


def save_as_xrv(monkeypatch, paths, build) -> nn.Module:
    """torch.save(model) of ``build(module)`` as TorchXRayVision saved its weights: the whole pickled module, in
    torch's legacy format (its 2020 release files) at ``paths[0]`` and in the zip format at ``paths[1:]``."""
    with monkeypatch.context() as m:  # the fake package exists only while saving: loading cannot import it
        module = _xrv_module()
        m.setitem(sys.modules, "torchxrayvision", types.ModuleType("torchxrayvision"))
        m.setitem(sys.modules, "torchxrayvision.models", module)
        model = build(module).eval()
        model._backend = _OldBackend()
        with warnings.catch_warnings():  # the legacy format keeps a module's source: a class made here has none
            warnings.filterwarnings("ignore", "Couldn't retrieve source code")
            torch.save(model, paths[0], _use_new_zipfile_serialization=False)
        for path in paths[1:]:
            torch.save(model, path)
    del model._backend
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xrv")
    with pytest.MonkeyPatch.context() as monkeypatch:
        source = save_as_xrv(monkeypatch, [tmp / "xrv-densenet.pt", tmp / "zipped.pt"], lambda m: m.DenseNet())
    return source, import_weights(tmp / "xrv-densenet.pt", tmp / "out"), tmp


def test_a_torchxrayvision_checkpoint_becomes_safetensors_and_json(converted):
    source, done, _ = converted
    assert done.weights.name == "xrv-densenet.safetensors" and done.info.name == "xrv-densenet.json"
    info = json.loads(done.info.read_text())
    assert info["source"]["kind"] == "torchxrayvision.models.DenseNet" and info["arch"] == "densenet121"
    assert (info["norm_mean"], info["norm_std"], info["in_channels"]) == (0.5, XRV_STD, 1)
    assert info["labels"] == PATHOLOGIES
    assert info["op_threshs"] == pytest.approx(source.op_threshs.tolist())
    zipped = import_weights(converted[2] / "zipped.pt", converted[2] / "out")  # torch's zip format: the same tensors
    assert zipped.weights.read_bytes() == done.weights.read_bytes()


def test_model_weights_path_loads_it_with_its_normalisation(converted):
    source, done, _ = converted
    model = build_model("densenet121", 1, weights=str(done.weights)).eval()
    assert (model.spec["norm_mean"], model.spec["norm_std"]) == (0.5, XRV_STD)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():  # the same features as TorchXRayVision's model on its own input scale
        ours = model.feature_map(x)
        theirs = torch.relu(source.features((x - 0.5) * 2048))
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_a_json_describing_another_file_is_refused(converted, tmp_path):
    _, done, _ = converted
    copy = tmp_path / done.weights.name
    copy.write_bytes(done.weights.read_bytes()[:-4] + b"\0\0\0\0")
    (tmp_path / done.info.name).write_text(done.info.read_text())
    with pytest.raises(ModelError, match="describes another file"):
        read_info(copy, "densenet121")  # what load_weights reads before loading a tensor
    with pytest.raises(ModelError, match="densenet121 weights .* set model.arch=densenet121"):
        read_info(done.weights, "resnet18")


class _RunsCode:
    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zipped", [True, False])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, zipped):
    marker = tmp_path / "pwned"
    evil = {"state_dict": {"w": torch.zeros(1)}, "extra": _RunsCode(marker)}
    torch.save(evil, tmp_path / "evil.pt", _use_new_zipfile_serialization=zipped)
    with pytest.raises(ModelError, match=r"refusing .*evil\.pt.*system"):
        import_weights(tmp_path / "evil.pt", tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_an_unexpected_class_even_of_torchxrayvision_is_refused(tmp_path, monkeypatch):
    paths = [tmp_path / "legacy.pt", tmp_path / "zipped.pt"]
    save_as_xrv(monkeypatch, paths, lambda module: nn.Sequential(nn.Conv2d(1, 2, 3), module.Sneaky()))
    for path in paths:
        with pytest.raises(ModelError, match="torchxrayvision.models.Sneaky"):
            import_weights(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_state_dict_of_another_arch_is_refused(tmp_path):
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "resnet.pth")
    with pytest.raises(ModelError, match="do not fit arch 'densenet121'"):
        import_weights(tmp_path / "resnet.pth", tmp_path / "out")


def test_download_offline_fails_with_what_to_do(tmp_path, monkeypatch):
    def offline(url, dst, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ModelError, match=r"could not download .*densenet121-res224-all from https://.*offline"):
        download("densenet121-res224-all")
    assert labels_of("densenet121-res224-rsna").count("") == 16


def test_the_cli_converts_and_refuses_in_one_line(converted):
    _, _, tmp = converted
    ok = cxr_here(tmp, "import-weights", "xrv-densenet.pt", "--out", "cli")
    assert "model.weights=cli/xrv-densenet.safetensors" in ok.stderr and (tmp / "cli" / "xrv-densenet.json").exists()
    bad = cxr_here(tmp, "import-weights", "--download", "nope", check=False)
    assert bad.returncode == 2 and "unknown TorchXRayVision weights 'nope'" in bad.stderr
