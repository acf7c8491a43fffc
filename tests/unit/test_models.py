"""Unit tests for cxr.models (CPU only, small inputs, never touches the network)."""

from __future__ import annotations

import json
import logging
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

from cxr.models import (
    ARCHS,
    CXRNet,
    Ensemble,
    ModelError,
    TestTimeAugmentation,
    build_from_spec,
    build_model,
    imagenet_weights_path,
    model_spec,
)
from cxr.models.archs import SPECS
from cxr.models.networks import PRETRAINED_MEAN, PRETRAINED_STD
from cxr.models.predictor import Predictor
from support.varied_model import predictor_with_ood, simple_cnn, synthetic_films

X64 = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any download attempt fails as if offline."""

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)


@pytest.fixture
def hub_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub dir under tmp_path."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    assert Path(torch.hub.get_dir()).is_relative_to(tmp_path)
    return Path(torch.hub.get_dir())


def _random_resnet18_state() -> dict[str, torch.Tensor]:
    """A torchvision resnet18 state dict (3-channel conv1) with random values, BN stats included."""
    torch.manual_seed(1)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    return {k: (torch.randn_like(v) if v.is_floating_point() else v.clone()) for k, v in sd.items()}


# -- shapes for every arch --------------------------------------------------------------------


def _input(arch: str) -> torch.Tensor:
    """Two films at 64 px, or at the arch's smallest side where that is larger (inception_v3: 75)."""
    side = max(64, SPECS[arch].min_size)
    return torch.rand(2, 1, side, side, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_builds_and_forwards(arch: str) -> None:
    n_out = 1 if arch in ("resnet50", "densenet121") else 3
    x = _input(arch)
    model = build_model(arch, n_out, image_size=x.shape[-1]).eval()
    with torch.no_grad():
        out = model(x)
        feats = model.features(x)
    assert out.shape == (2, n_out)
    assert feats.shape == (2, model.feature_dim)
    assert torch.isfinite(out).all()
    assert model.spec["norm_mean"] == 0.5 and model.spec["norm_std"] == 0.25
    if SPECS[arch].gradcam:
        assert model.gradcam_module is model.get_submodule(model.gradcam_layer)
    else:  # no convolutional map: explain refuses it as it refuses the linear baseline
        assert model.gradcam_layer is None and not hasattr(model, "gradcam_module")
    for name in [*model.ood_stages, *model.blocks]:
        model.get_submodule(name)  # the spec names modules that exist
    assert model.backbone.state_dict()  # no leftover classifier
    assert not any(k.startswith(("backbone.fc.", "backbone.classifier.")) for k in model.state_dict())


@pytest.mark.parametrize("arch", ["simple_cnn", "resnet18", "mobilenet_v3_small"])
def test_channels_last_train_step_matches_contiguous(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 2, dropout=0.0)
    ref = build_from_spec(model.spec)
    ref.load_state_dict(model.state_dict())
    model = model.to(memory_format=torch.channels_last)
    out_cl = model(X64.contiguous(memory_format=torch.channels_last))
    out_ref = ref(X64)
    torch.testing.assert_close(out_cl, out_ref, rtol=1e-4, atol=1e-4)
    out_cl.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_simple_cnn_width_and_resolution() -> None:
    model = build_model("simple_cnn", 1, width=8).eval()
    assert model.feature_dim == 64
    with torch.no_grad():
        assert model.feature_map(torch.rand(2, 1, 28, 28)).shape == (2, 64, 4, 4)
        assert model.feature_map(X64).shape == (2, 64, 8, 8)


def test_gradcam_hooks_work_on_densenet() -> None:
    """Full backward hooks on the Grad-CAM layer need no in-place op downstream of it."""
    model = build_model("densenet121", 1).eval()
    seen: dict[str, torch.Tensor] = {}
    layer = model.gradcam_module
    h1 = layer.register_forward_hook(lambda m, i, o: seen.__setitem__("act", o))
    h2 = layer.register_full_backward_hook(lambda m, gi, go: seen.__setitem__("grad", go[0]))
    try:
        model(X64.clone().requires_grad_()).sum().backward()
    finally:
        h1.remove()
        h2.remove()
    assert seen["act"].shape == seen["grad"].shape == (2, 1024, 2, 2)


# -- inputs -----------------------------------------------------------------------------------


def test_tabular_fusion_changes_output() -> None:
    torch.manual_seed(0)
    model = build_model("simple_cnn", 3, width=8, n_tabular=5).eval()
    tab_a = torch.tensor([[0.3, 1, 0, 1, 0], [0.7, 0, 1, 0, 1]])
    tab_b = tab_a.clone()
    tab_b[:, 0] += 0.5
    with torch.no_grad():
        out_a = model(X64, tab_a)
        out_b = model(X64, tab_b)
    assert out_a.shape == (2, 3)
    assert not torch.allclose(out_a, out_b)
    with pytest.raises(ModelError, match="tabular"):
        model(X64)
    with pytest.raises(ModelError, match=r"\(2, 5\)"):
        model(X64, tab_a[:, :4])


def test_no_tabular_model_accepts_none_and_rejects_features() -> None:
    model = build_model("simple_cnn", 1, width=8).eval()
    with torch.no_grad():
        assert model(X64, None).shape == (2, 1)
        assert model(X64, torch.empty(2, 0)).shape == (2, 1)
        with pytest.raises(ModelError, match="n_tabular=0"):
            model(X64, torch.rand(2, 3))


def test_bad_image_input_is_rejected() -> None:
    model = build_model("simple_cnn", 1, width=8)
    with pytest.raises(ModelError, match=r"\(B, 1, H, W\)"):
        model(torch.rand(2, 3, 32, 32))
    with pytest.raises(ModelError, match="float"):
        model(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))


# -- argument errors --------------------------------------------------------------------------


def test_unknown_arch_lists_valid_names() -> None:
    with pytest.raises(ModelError) as info:
        build_model("vgg16", 1)
    assert isinstance(info.value, ValueError)
    for name in ARCHS:
        assert name in str(info.value)


@pytest.mark.parametrize("kwargs", [{"n_outputs": 0}, {"dropout": 1.0}, {"width": 2}, {"n_tabular": -1}])
def test_invalid_parameters(kwargs: dict) -> None:
    args = {"n_outputs": 1, **kwargs}
    with pytest.raises(ModelError):
        build_model("simple_cnn", args.pop("n_outputs"), **args)


# -- weights ----------------------------------------------------------------------------------


def test_missing_weights_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "resnet18.pth"
    with pytest.raises(ModelError, match="not found") as info:
        build_model("resnet18", 1, weights=str(path))
    assert str(path) in str(info.value)


def test_imagenet_without_cache_or_network_says_where_to_put_the_file(hub_dir: Path) -> None:
    with pytest.raises(ModelError) as info:
        build_model("resnet18", 1, weights="imagenet")
    msg = str(info.value)
    expected = hub_dir / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in msg
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert not expected.exists()


def test_imagenet_is_read_from_the_hub_cache(hub_dir: Path) -> None:
    sd = _random_resnet18_state()
    path = imagenet_weights_path("resnet18")
    assert path == hub_dir / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(sd, path)
    model = build_model("resnet18", 2, weights="imagenet")
    torch.testing.assert_close(model.backbone.conv1.weight, sd["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.backbone.layer4[1].bn2.running_var, sd["layer4.1.bn2.running_var"])
    assert model.spec["norm_mean"] == PRETRAINED_MEAN and model.spec["norm_std"] == PRETRAINED_STD


def test_simple_cnn_has_no_imagenet_weights() -> None:
    with pytest.raises(ModelError, match="no pretrained weights for simple_cnn"):
        build_model("simple_cnn", 1, weights="imagenet")


def test_googlenet_pretrained_normalisation() -> None:
    # its TF-ported weights expect (x - 0.5) / 0.5 (what transform_input=True would produce)
    spec = model_spec("googlenet", 1, weights="imagenet")
    assert (spec["norm_mean"], spec["norm_std"]) == (0.5, 0.5)
    assert model_spec("resnet18", 1, weights="imagenet")["norm_mean"] == PRETRAINED_MEAN


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_torchvision_state_dict_is_adapted_to_one_channel(tmp_path: Path, suffix: str) -> None:
    sd = _random_resnet18_state()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    model = build_model("resnet18", 3, weights=str(path))
    got = model.backbone.state_dict()
    assert got["conv1.weight"].shape == (64, 1, 7, 7)
    torch.testing.assert_close(got["conv1.weight"], sd["conv1.weight"].sum(dim=1, keepdim=True))
    rest = [k for k in sd if k != "conv1.weight" and not k.startswith("fc.")]
    assert set(rest) == set(got) - {"conv1.weight"}
    for k in rest:
        torch.testing.assert_close(got[k], sd[k], rtol=0, atol=0, msg=k)
    assert model.spec["norm_mean"] == PRETRAINED_MEAN


def test_summed_conv_matches_rgb_replicated_input(tmp_path: Path) -> None:
    sd = _random_resnet18_state()
    torch.save(sd, tmp_path / "r18.pt")
    model = build_model("resnet18", 1, weights=str(tmp_path / "r18.pt"))
    grey = torch.rand(2, 1, 32, 32)
    rgb_conv = torch.nn.functional.conv2d(grey.expand(-1, 3, -1, -1), sd["conv1.weight"], stride=2, padding=3)
    torch.testing.assert_close(model.backbone.conv1(grey), rgb_conv, rtol=1e-4, atol=1e-4)


def test_mismatching_keys_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(_random_resnet18_state(), path)
    with pytest.raises(ModelError) as info:
        build_model("resnet34", 1, weights=str(path))  # resnet34 has more blocks
    msg = str(info.value)
    assert "missing keys" in msg and "layer1.2." in msg and str(path) in msg

    sd = _random_resnet18_state()
    sd["extra.weight"] = torch.zeros(3)
    sd["layer1.0.conv1.weight"] = torch.zeros(8, 64, 3, 3)
    torch.save(sd, path)
    with pytest.raises(ModelError) as info:
        build_model("resnet18", 1, weights=str(path))
    msg = str(info.value)
    assert "unexpected keys (extra.weight)" in msg
    assert "shape mismatch" in msg and "layer1.0.conv1.weight" in msg


def test_pickled_objects_are_refused_and_never_run(tmp_path: Path) -> None:
    _Evil.ran = False
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Evil()}, path)
    with pytest.raises(ModelError, match="refusing to load") as info:
        build_model("resnet18", 1, weights=str(path))
    assert str(path) in str(info.value)
    assert _Evil.ran is False


def test_non_state_dict_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ModelError, match="not a state dict"):
        build_model("resnet18", 1, weights=str(path))


def test_full_cxrnet_file_round_trip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    src = build_model("simple_cnn", 3, width=8, n_tabular=4).eval()
    with torch.no_grad():
        src.norm_mean.fill_(0.4)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))

    same = build_model("simple_cnn", 3, width=8, n_tabular=4, weights=str(path)).eval()
    tab = torch.rand(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(same(X64, tab), src(X64, tab), rtol=0, atol=0)
    assert same.spec["norm_mean"] == 0.4  # buffers come from the file

    # transfer to another label set without tabular input: head re-initialised with a warning
    with caplog.at_level(logging.WARNING, logger="cxr.models"):
        other = build_model("simple_cnn", 1, width=8, weights=str(path))
    assert "head.weight" in caplog.text
    torch.testing.assert_close(other.backbone.stem[0].weight, src.backbone.stem[0].weight)

    with pytest.raises(ModelError, match="shape mismatches"):
        build_model("simple_cnn", 3, width=16, n_tabular=4, weights=str(path))


def test_a_trained_models_file_with_its_ood_statistics_starts_another_training(tmp_path: Path) -> None:
    films = synthetic_films(16, 32)
    saved = predictor_with_ood(simple_cnn(), 32, films).save(tmp_path / "model")
    assert any(k.startswith("ood.") for k in load_file(str(saved / "model.safetensors")))
    again = build_model("simple_cnn", 1, width=8, weights=str(saved / "model.safetensors")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(X64), Predictor.from_dir(saved).model(X64))  # its layout: 1e-9 apart


# -- spec -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,n_tabular", [("simple_cnn", 3), ("mobilenet_v3_small", 0)])
def test_spec_round_trip_gives_identical_outputs(arch: str, n_tabular: int) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 4, dropout=0.3, width=16, n_tabular=n_tabular).eval()
    spec = json.loads(json.dumps(model.spec))
    assert spec == {
        "arch": arch,
        "n_outputs": 4,
        "dropout": 0.3,
        "width": 16,
        "n_tabular": n_tabular,
        "norm_mean": 0.5,
        "norm_std": 0.25,
    }
    assert spec == model_spec(arch, 4, dropout=0.3, width=16, n_tabular=n_tabular)
    rebuilt = build_from_spec(spec)
    assert isinstance(rebuilt, CXRNet)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    tab = torch.rand(2, n_tabular) if n_tabular else None
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(X64, tab), model(X64, tab), rtol=0, atol=0)


def test_spec_keeps_pretrained_normalisation(tmp_path: Path) -> None:
    torch.save(_random_resnet18_state(), tmp_path / "r18.pth")
    model = build_model("resnet18", 1, weights=str(tmp_path / "r18.pth"))
    assert (model.spec["norm_mean"], model.spec["norm_std"]) == (0.449, 0.226)
    rebuilt = build_from_spec(model.spec)
    assert rebuilt.norm_mean.item() == model.norm_mean.item()


def test_build_from_spec_rejects_bad_specs() -> None:
    spec = model_spec("simple_cnn", 1)
    with pytest.raises(ModelError, match="missing"):
        build_from_spec({k: v for k, v in spec.items() if k != "width"})
    with pytest.raises(ModelError, match="unknown"):
        build_from_spec({**spec, "colour": "red"})
    with pytest.raises(ModelError, match="valid names"):
        build_from_spec({**spec, "arch": "alexnet"})


def test_ensemble_averages_member_logits_and_rebuilds_from_its_spec() -> None:
    torch.manual_seed(0)
    members = [build_model("simple_cnn", 3, width=8, n_tabular=2).eval() for _ in range(3)]
    ensemble = Ensemble(members).eval()
    tab = torch.rand(2, 2)
    with torch.no_grad():
        expected = torch.stack([m(X64, tab) for m in members]).mean(0)
        torch.testing.assert_close(ensemble(X64, tab), expected)
    spec = json.loads(json.dumps(ensemble.spec))
    assert spec["arch"] == "ensemble" and spec["n_tabular"] == 2 and spec["members"] == [m.spec for m in members]
    rebuilt = build_from_spec(spec)
    rebuilt.load_state_dict(ensemble.state_dict())  # strict: the same parameter names, members.<i>.*
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(X64, tab), ensemble(X64, tab), rtol=0, atol=0)


def test_a_cross_architecture_ensemble_feeds_each_member_its_size_and_weights_their_logits() -> None:
    torch.manual_seed(0)
    cnn, mlp = build_model("simple_cnn", 1, width=8).eval(), build_model("mlp", 1, width=16, image_size=28).eval()
    ensemble = Ensemble([cnn, mlp], weights=[3, 1], input_sizes=[64, 28]).eval()
    with torch.no_grad():
        # the mlp sees the film as preprocessing would have downscaled it (PIL's filter is torch's antialiased one)
        small = torch.nn.functional.interpolate(X64, size=(28, 28), mode="bilinear", antialias=True)
        torch.testing.assert_close(ensemble.stacked(X64), torch.stack([cnn(X64), mlp(small)]))
        torch.testing.assert_close(ensemble(X64), 0.75 * cnn(X64) + 0.25 * mlp(small))
    spec = json.loads(json.dumps(ensemble.spec))
    assert (spec["weights"], spec["input_sizes"], spec["image_size"]) == ([0.75, 0.25], [64, 28], 64)
    rebuilt = build_from_spec(spec)
    rebuilt.load_state_dict(ensemble.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(X64), ensemble(X64), rtol=0, atol=0)


def test_ensemble_refuses_members_that_do_not_fit_together() -> None:
    with pytest.raises(ModelError, match="at least 2"):
        Ensemble([build_model("simple_cnn", 1, width=8)])
    with pytest.raises(ModelError, match="disagree"):
        Ensemble([build_model("simple_cnn", 1, width=8), build_model("simple_cnn", 2, width=8)])
    pair = [build_model("simple_cnn", 1, width=8), build_model("simple_cnn", 1, width=8)]
    for weights in ([1.0], [1.0, -0.5], [0.0, 0.0]):
        with pytest.raises(ModelError, match="non-negative"):
            Ensemble(pair, weights=weights)
    with pytest.raises(ModelError, match="do not fit"):
        Ensemble(pair, input_sizes=[64, 96], image_size=64)


def test_test_time_augmentation_averages_fixed_views_and_rebuilds_from_its_spec() -> None:
    from cxr.config import AugmentConfig
    from cxr.data.augment import apply_augment, draw_augment

    torch.manual_seed(0)
    net = build_model("simple_cnn", 1, width=8, n_tabular=2).eval()
    views = draw_augment(3, AugmentConfig(strength=1.0), torch.Generator().manual_seed(0))
    tta = TestTimeAugmentation(net, views).eval()
    x = torch.rand(5, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    tab = torch.rand(5, 2)
    with torch.no_grad():
        expected = torch.stack([net(apply_augment(x, v.expand(5, -1)), tab) for v in views]).mean(0)
        out = tta(x, tab)
        torch.testing.assert_close(out, expected)
        assert not torch.allclose(out, net(x, tab))  # the views are not the film itself
        # every film sees the same views whatever it is batched with: its score alone is its score in the batch
        torch.testing.assert_close(tta(x[3:4], tab[3:4]), out[3:4], rtol=1e-5, atol=1e-6)
    spec = json.loads(json.dumps(tta.spec))
    assert spec["arch"] == "tta" and spec["n_tabular"] == 2 and spec["network"] == net.spec
    rebuilt = build_from_spec(spec)
    rebuilt.load_state_dict(tta.state_dict())  # strict: network.* only, the views travel in the spec
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x, tab), out, rtol=0, atol=0)
    with pytest.raises(ModelError, match="views"):
        TestTimeAugmentation(net, torch.zeros(2, 5))


class _Evil:
    """Unpickling this would call _mark_ran; weights_only=True must refuse before that."""

    ran = False

    def __reduce__(self):  # noqa: D401
        return (_mark_ran, ())


def _mark_ran() -> None:
    _Evil.ran = True


def test_torchvision_checkpoint_quirks_are_handled(tmp_path: Path) -> None:
    """googlenet aux heads and classifiers are dropped; old densenet 'norm.1' keys are renamed."""
    torch.manual_seed(0)
    g = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True).state_dict()
    torch.save(g, tmp_path / "g.pth")
    model = build_model("googlenet", 1, weights=str(tmp_path / "g.pth"))
    torch.testing.assert_close(model.backbone.conv1.conv.weight, g["conv1.conv.weight"].sum(1, keepdim=True))

    d = torchvision.models.densenet121(weights=None).state_dict()
    old = {
        k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v
        for k, v in d.items()
        if not k.endswith("num_batches_tracked")
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    save_file(old, str(tmp_path / "d.safetensors"))
    model = build_model("densenet121", 1, weights=str(tmp_path / "d.safetensors"))
    got = model.backbone.features.denseblock4.denselayer16.conv2.weight
    torch.testing.assert_close(got, d["features.denseblock4.denselayer16.conv2.weight"])


# -- vgg19, inception_v3, mlp -----------------------------------------------------------------


def _torchvision_like_state(arch: str, **options: object) -> dict[str, torch.Tensor]:
    """Random tensors shaped as torchvision's ``arch`` checkpoint (built on the meta device: no init cost); the
    classifier's and auxiliary heads' keys are there, as placeholders (they are dropped)."""
    with torch.device("meta"):
        shapes = torchvision.models.get_model(arch, weights=None, **options).state_dict()
    gen, foreign = torch.Generator().manual_seed(0), SPECS[arch].foreign_prefixes
    return {
        k: torch.zeros(1)
        if k.startswith(foreign)
        else torch.randn(v.shape, generator=gen)
        if v.is_floating_point()
        else torch.zeros(v.shape, dtype=v.dtype)
        for k, v in shapes.items()
    }


@pytest.mark.parametrize(
    "arch,options,first_conv",
    [("vgg19", {}, "features.0"), ("inception_v3", {"aux_logits": True, "init_weights": False}, "Conv2d_1a_3x3.conv")],
)
def test_new_archs_take_torchvision_checkpoints(tmp_path: Path, arch: str, options: dict, first_conv: str) -> None:
    """The ImageNet files' layout: classifier and auxiliary head dropped, the RGB first conv summed to grey."""
    sd = _torchvision_like_state(arch, **options)
    save_file(sd, str(tmp_path / f"{arch}.safetensors"))
    model = build_model(arch, 1, weights=str(tmp_path / f"{arch}.safetensors"))
    got = model.backbone.get_submodule(first_conv).weight
    torch.testing.assert_close(got, sd[f"{first_conv}.weight"].sum(1, keepdim=True))
    assert model.spec["norm_mean"] == (0.5 if arch == "inception_v3" else PRETRAINED_MEAN)  # TF-ported: [-1, 1]


@pytest.mark.parametrize("arch,file", [("vgg19", "vgg19-dcbb9e9d.pth"), ("inception_v3", "inception_v3_google")])
def test_new_archs_imagenet_offline_names_the_file(hub_dir: Path, arch: str, file: str) -> None:
    with pytest.raises(ModelError, match="not cached and could not be downloaded") as info:
        build_model(arch, 1, weights="imagenet")
    assert str(hub_dir / "checkpoints" / file) in str(info.value)


def test_inception_refuses_inputs_below_its_minimum_in_one_line() -> None:
    with pytest.raises(ModelError, match=r"inception_v3 needs inputs of at least 75 px .*299.*model.image_size >= 75"):
        build_model("inception_v3", 1, image_size=64)
    assert model_spec("inception_v3", 1, image_size=75)["arch"] == "inception_v3"  # no image_size recorded
    assert "image_size" not in model_spec("inception_v3", 1, image_size=75)
    with pytest.raises(ModelError, match="at least 32 px"):
        build_model("vgg19", 1, image_size=16)


def test_mlp_is_built_for_its_input_side_and_has_no_feature_map() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", 2, width=4, image_size=32, n_tabular=2).eval()
    assert [m.out_features for m in model.backbone.modules() if isinstance(m, torch.nn.Linear)] == [64, 32]
    spec = json.loads(json.dumps(model.spec))
    assert spec["image_size"] == 32 and spec == model_spec("mlp", 2, width=4, image_size=32, n_tabular=2)
    rebuilt = build_from_spec(spec).eval()
    rebuilt.load_state_dict(model.state_dict())
    x, tab = torch.rand(3, 1, 32, 32), torch.rand(3, 2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, tab), model(x, tab), rtol=0, atol=0)
        with pytest.raises(ModelError, match="takes 32x32 inputs"):
            model(X64, torch.rand(2, 2))
    assert model.ood_stages == [] and not hasattr(model, "gradcam_module")
    with pytest.raises(ModelError, match="built for one input size"):
        build_model("mlp", 1)
    with pytest.raises(ModelError, match="no pretrained weights for mlp"):
        build_model("mlp", 1, image_size=32, weights="imagenet")
