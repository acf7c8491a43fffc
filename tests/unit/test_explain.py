"""Grad-CAM math, the crude lung mask and the explanation overlay."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from cxr.data.sources.synthetic import render_layers
from cxr.errors import UserError
from cxr.imaging import Image
from cxr.models import Ensemble, build_model
from cxr.preprocess import PreprocessSpec, preprocess
from cxr.serving.explain import EMPTY_GRADCAM, NO_LUNG_MASK, explain, gradcam, is_empty, lung_mask, lung_share


def test_gradcam_is_the_weighted_feature_map_of_the_gradcam_layer():
    torch.manual_seed(0)
    model = build_model("simple_cnn", 3, width=8).eval()
    x = torch.rand(1, 1, 32, 32)
    heat = gradcam(model, x, target=2)
    # the same quantity computed by hand from the model's own feature map
    fmap = model.feature_map(x).detach().requires_grad_(True)
    logit = model.head(fmap.mean(dim=(2, 3)))[0, 2]
    (grad,) = torch.autograd.grad(logit, fmap)
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * fmap).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
    expected = (cam / cam.max()).detach().numpy()
    assert heat.shape == (32, 32) and heat.dtype == np.float32
    np.testing.assert_allclose(heat, expected, atol=1e-5)
    assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)


def test_gradcam_points_at_the_only_evidence():
    # With a zero-mean input normalisation and a head that sums the features, only the bright square
    # produces activations, so the heat must sit on it.
    torch.manual_seed(0)
    model = build_model("simple_cnn", 1, width=8).eval()
    model.norm_mean.zero_()
    with torch.no_grad():
        model.head.weight.fill_(1.0)
    x = torch.zeros(1, 1, 64, 64)
    x[..., 40:56, 8:24] = 1.0  # lower left
    heat = gradcam(model, x, target=0)
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    assert 32 <= peak[0] < 64 and 0 <= peak[1] < 32
    assert heat[32:, :32].sum() > 0.8 * heat.sum()  # the lower-left quadrant holds the heat


def test_gradcam_leaves_the_model_as_it_was():
    model = build_model("simple_cnn", 1, width=8)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gradcam(model, torch.rand(1, 1, 32, 32))
    assert model.training and not model.gradcam_module._forward_hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_lung_mask_overlaps_the_synthetic_lungs():
    ious = []
    for i in range(12):
        r = render_layers(np.random.default_rng(i), i % 2, 0.6, 128)
        mask = lung_mask(preprocess(r.image, PreprocessSpec(size=128)))
        ious.append(0.0 if mask is None else (mask & r.lung_mask).sum() / (mask | r.lung_mask).sum())
    assert np.median(ious) > 0.45, ious


@pytest.mark.parametrize(
    "image", [np.zeros((64, 64), np.uint8), np.full((64, 64), 255, np.uint8)], ids=["black", "white"]
)
def test_lung_mask_gives_up_on_images_without_lungs(image):
    assert lung_mask(image) is None


def test_lung_share():
    mask = np.zeros((8, 8), bool)
    mask[:, :4] = True
    heat = np.zeros((8, 8), np.float32)
    heat[:, :4] = 1.0
    assert lung_share(heat, mask) == 1.0
    assert lung_share(1.0 - heat, mask) == 0.0
    assert lung_share(np.ones((8, 8)), mask) == 0.5
    assert lung_share(np.zeros((8, 8)), mask) is None  # no heat has no share, not a share of 0


@pytest.mark.parametrize(
    "heat,empty",
    [
        (np.zeros((8, 8)), True),
        (np.full((8, 8), 0.7), True),
        (np.full((8, 8), 1.0) + np.random.default_rng(0).random((8, 8)) * 1e-8, True),  # float noise
        (np.where(np.eye(8) > 0, np.nan, 0.5), True),
        (np.eye(8), False),
        (np.linspace(0, 1e-3, 64).reshape(8, 8), False),  # faint is still a location
    ],
    ids=["zeros", "constant", "noise", "nan", "diagonal", "faint"],
)
def test_is_empty(heat, empty):
    assert is_empty(heat) is empty


def with_heat(predictor):
    """The network's score rises with every feature channel, so its Grad-CAM has heat wherever features fire
    (at random init the channel weights often all cancel out to an empty map)."""
    with torch.no_grad():
        predictor.model.head.weight.abs_()
    return predictor


def film(seed: int = 3) -> Image:
    """A synthetic frontal film (256 px) whose lung mask the crude estimator finds."""
    return Image(render_layers(np.random.default_rng(seed), 1, 0.3, 256).image.astype(np.float32), {"view": "PA"})


def test_an_empty_gradcam_is_reported_as_such_never_as_a_share_of_zero(tiny_predictor):
    predictor = with_heat(tiny_predictor(32))
    normal = explain(predictor, film())
    assert normal.lung_share is not None and 0.0 < normal.lung_share <= 1.0 and normal.warnings == []
    with torch.no_grad():  # the score ignores the image: the gradient reaching the feature map is zero
        predictor.model.head.weight.zero_()
    result = explain(predictor, film())
    assert result.warnings == [EMPTY_GRADCAM] and result.lung_share is None
    assert result.lung_area == normal.lung_area  # the mask is still there: the share is missing, not the lungs
    assert not result.heatmap.any()
    rgb = np.asarray(PILImage.open(io.BytesIO(result.png)))
    assert (rgb == rgb[..., :1]).all()  # grey film and white outline: not one coloured pixel


def test_no_lung_mask_is_a_warning_and_no_share(tiny_predictor):
    noise = Image(np.random.default_rng(0).random((64, 64)).astype(np.float32), {"format": "jpeg"})
    result = explain(with_heat(tiny_predictor(32)), noise)
    assert result.lung_share is None and result.lung_area is None and result.warnings == [NO_LUNG_MASK]


def test_explain_returns_a_png_over_the_image_and_the_lung_share(tiny_predictor):
    predictor = with_heat(tiny_predictor(32))
    r = render_layers(np.random.default_rng(3), 1, 0.3, 256)
    result = explain(predictor, Image(r.image.astype(np.float32), {"view": "PA"}))
    assert result.heatmap.shape == (32, 32)
    assert result.label == "pneumonia"
    p = predictor.predict_proba(predictor.prepare_input(Image(r.image.astype(np.float32)))[None])[0]
    assert result.probability == pytest.approx(float(p), abs=1e-6)
    assert result.lung_share is not None and 0.0 < result.lung_share <= 1.0 and result.warnings == []
    assert 0.05 < result.lung_area < 0.6
    png = PILImage.open(io.BytesIO(result.png))
    assert png.format == "PNG" and png.mode == "RGB" and png.size == (384, 384)


def test_explain_an_ensemble_shows_the_mean_of_its_members_maps(tiny_predictor):
    members = [tiny_predictor(32, seed=seed) for seed in (1, 2)]
    ensemble = tiny_predictor(32)
    ensemble.model = Ensemble([m.model for m in members]).eval()
    image = Image(render_layers(np.random.default_rng(3), 1, 0.3, 256).image.astype(np.float32))
    maps = [explain(m, image).heatmap for m in members]
    assert not np.allclose(maps[0], maps[1])
    mean = (maps[0] + maps[1]) / 2
    np.testing.assert_allclose(explain(ensemble, image).heatmap, mean / mean.max(), atol=1e-5)


def test_explain_multiclass_defaults_to_the_top_label_and_refuses_unknown_labels(tiny_predictor):
    predictor = tiny_predictor(32, task="multiclass", labels=("a", "b", "c"))
    image = Image(np.random.default_rng(0).random((64, 64)).astype(np.float32))
    probs = predictor.predict_proba(predictor.prepare_input(image)[None])[0]
    assert explain(predictor, image).label == "abc"[int(np.argmax(probs))]
    assert explain(predictor, image, label="c").label == "c"
    with pytest.raises(UserError, match="cannot explain label 'd'"):
        explain(predictor, image, label="d")
