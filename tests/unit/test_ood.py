"""The out-of-distribution check: fitted on training films' feature statistics, saved with the weights, and
answers that abstain beyond its threshold, for one network, ensembles and test-time augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr.config import AugmentConfig
from cxr.data.augment import draw_augment
from cxr.models import build_model
from cxr.models.archs import SPECS
from cxr.models.card import OodCheck
from cxr.models.networks import ARCHS, CXRNet
from cxr.models.ood import METHOD, FeatureTap, OodDetector, ood_stages
from cxr.models.predictor import ABSTAIN, Predictor
from cxr.models.wrappers import Ensemble, TestTimeAugmentation
from support.tiny_model import tiny_card


def films(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Smooth chest-like films: a bright body with two dark lung fields, jittered."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    out = []
    for _ in range(n):
        cx = 0.5 + rng.normal(0, 0.02)
        lungs = np.exp(-(((xx - cx + 0.18) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2))
        lungs += np.exp(-(((xx - cx - 0.18) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2))
        img = 0.8 - 0.5 * lungs + rng.normal(0, 0.02, (size, size))
        out.append(np.clip(img * 255, 0, 255).astype(np.uint8))
    return np.stack(out)


def fitted_predictor(model: torch.nn.Module, train: np.ndarray, val: np.ndarray) -> Predictor:
    """What training does: statistics from training films, the threshold letting 95% of validation through."""
    stages = ood_stages(model.eval())
    detector = OodDetector.fitted(summaries(model, stages, train), np.arange(len(train)) % 2)
    scores = detector.score(summaries(model, stages, val))
    t = float(np.quantile(scores, 0.95))
    check = OodCheck(method=METHOD, stages=stages, dims=detector.dims, classes=2, threshold=t,
                     val_pass_rate=float(np.mean(scores <= t)), fit_images=len(train))  # fmt: skip
    return Predictor(model, tiny_card(model.spec).model_copy(update={"ood": check}), ood=detector)


@torch.no_grad()
def summaries(model: torch.nn.Module, stages: list[str], images: np.ndarray) -> list[np.ndarray]:
    with FeatureTap(model, stages) as tap:
        model(torch.from_numpy(images).unsqueeze(1).float() / 255)
    return tap.take()


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    return fitted_predictor(build_model("simple_cnn", 1, width=8), films(200, 0), films(60, 1))


def test_noise_and_an_inverted_film_are_out_of_distribution_and_new_films_mostly_not(predictor):
    new = predictor.score(films(60, 2))
    assert np.mean(new.ood <= predictor.card.ood.threshold) >= 0.8
    noise = np.random.default_rng(3).integers(0, 256, (20, 32, 32), dtype=np.uint8)
    assert (predictor.score(noise).ood > predictor.card.ood.threshold).all()
    assert (predictor.score(255 - films(20, 4)).ood > predictor.card.ood.threshold).all()


def test_an_answer_out_of_distribution_abstains_unless_asked_to_decide(predictor):
    noise = np.random.default_rng(5).integers(0, 256, (1, 32, 32), dtype=np.uint8)
    scores = predictor.score(noise)
    answer = predictor.describe(scores.probs[0], **scores.of(0))
    assert answer["prediction"] == ABSTAIN and answer["positive"] is None
    assert answer["ood"]["in_distribution"] is False and answer["ood"]["score"] > answer["ood"]["threshold"]
    assert "out of distribution" in answer["abstain_reason"]
    decided = predictor.describe(scores.probs[0], **scores.of(0), decide_out_of_distribution=True)
    assert decided["prediction"] in predictor.labels and decided["positive"] in (True, False)
    assert decided["ood"]["in_distribution"] is False and "abstain_reason" not in decided
    inside = predictor.score(films(1, 6))
    assert predictor.describe(inside.probs[0], **inside.of(0))["prediction"] in predictor.labels
    with pytest.raises(ValueError, match="ood score"):  # never a decision for a film nobody checked
        predictor.describe(inside.probs[0])


def test_a_films_score_hardly_depends_on_its_batch(predictor):
    x = np.concatenate([films(7, 9), np.random.default_rng(9).integers(0, 256, (1, 32, 32), np.uint8)])
    alone = [predictor.score(x[i : i + 1]).ood[0] for i in range(len(x))]
    np.testing.assert_allclose(alone, predictor.score(x).ood, atol=1e-3)


def test_the_check_is_saved_in_the_weights_file_and_the_card(predictor, tmp_path):
    loaded = Predictor.from_dir(predictor.save(tmp_path / "model"))
    assert loaded.card.ood == predictor.card.ood
    x = films(8, 7)
    np.testing.assert_allclose(loaded.score(x).ood, predictor.score(x).ood, rtol=1e-5)
    assert loaded.score(x).spread is None  # one network: no spread


def test_scoring_with_the_check_gives_the_same_probabilities_as_without(predictor):
    x = films(8, 8)
    bare = Predictor(predictor.model, predictor.card.model_copy(update={"ood": None}))
    np.testing.assert_array_equal(predictor.score(x).probs, bare.score(x).probs)
    assert bare.score(x).ood is None and bare.describe(0.7)["ood"] == {"checked": False}


@pytest.mark.parametrize("arch", [a for a in ARCHS if SPECS[a].ood_stages])  # mlp: no spatial map to summarise
def test_every_architecture_names_stages_the_tap_reads(arch):
    net, side = CXRNet(arch, 1).eval(), max(64, SPECS[arch].min_size)
    with FeatureTap(net, ood_stages(net)) as tap, torch.no_grad():
        net(torch.rand(2, 1, side, side))
    summaries = tap.take()
    assert len(summaries) == 2 * len(net.ood_stages) >= 6
    assert all(s.shape[0] == 2 and s.ndim == 2 for s in summaries)


def test_ensembles_and_test_time_augmentation_are_checked_and_report_their_spread():
    torch.manual_seed(1)
    members = [build_model("simple_cnn", 1, width=8) for _ in range(2)]
    views = draw_augment(3, AugmentConfig(strength=1.0), torch.Generator().manual_seed(0))
    for model in (Ensemble(members), TestTimeAugmentation(Ensemble(members), views)):
        stages = ood_stages(model)
        assert stages[0].endswith("members.0.backbone.stem") and any(".members.1." in f".{s}" for s in stages)
        p = fitted_predictor(model, films(120, 0), films(40, 1))
        scores = p.score(
            np.concatenate([films(4, 2), np.random.default_rng(0).integers(0, 256, (2, 32, 32), np.uint8)])
        )
        assert scores.ood.shape == (6,) and (scores.ood[4:] > p.card.ood.threshold).all()
        assert scores.spread.shape == (6,) and (scores.spread > 0).all()  # the members (and views) disagree a little
        assert "uncertainty" in p.describe(scores.probs[0], **scores.of(0))
