"""Targets, tabular features, batches and augmentation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cxr.config import AugmentConfig
from cxr.data.augment import augment
from cxr.data.loader import encode_targets, tabular_features
from cxr.errors import UserError


def test_targets_per_task():
    labels = pd.Series(["normal", "pneumonia", "pneumonia"])
    assert encode_targets(labels, "binary", ["normal", "pneumonia"]).tolist() == [0, 1, 1]
    multi = encode_targets(pd.Series(["b", "a", "c"]), "multiclass", ["a", "b", "c"])
    assert multi.tolist() == [1, 0, 2] and multi.dtype == np.int64
    ml = encode_targets(pd.Series(["Mass|Nodule", "", "Nodule"]), "multilabel", ["Mass", "Nodule", "Hernia"])
    assert ml.tolist() == [[1, 1, 0], [0, 0, 0], [0, 1, 0]]
    with pytest.raises(UserError, match="not among the classes"):
        encode_targets(pd.Series(["covid"]), "binary", ["normal", "pneumonia"])


def test_tabular_features_encode_missing_values_explicitly():
    m = pd.DataFrame({"age": [45, None], "sex": ["F", None], "view": ["AP", "LL"]})
    t = tabular_features(m)
    assert t.shape == (2, 8)
    assert t[0].tolist() == pytest.approx([0.45, 0, 0, 1, 0, 0, 1, 0])
    assert t[1].tolist() == pytest.approx([0, 1, 0, 0, 1, 0, 0, 1])


def test_augment_keeps_range_and_is_identity_at_strength_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 32, 32, generator=g)
    assert torch.equal(augment(x, AugmentConfig(strength=0)), x)
    y = augment(x, AugmentConfig(), g)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 and not torch.equal(x, y)


def test_no_horizontal_flip_by_default():
    x = torch.zeros(64, 1, 32, 32)
    x[..., :10] = 1.0  # bright on the image's left, like a heart shadow on the other side
    g = torch.Generator().manual_seed(1)
    y = augment(x, AugmentConfig(), g)
    assert (y[..., :16].mean((1, 2, 3)) > y[..., 16:].mean((1, 2, 3))).all()
    flipped = augment(x, AugmentConfig(hflip=True), torch.Generator().manual_seed(1))
    assert (flipped[..., :16].mean((1, 2, 3)) < flipped[..., 16:].mean((1, 2, 3))).any()


def test_separable_affine_grid_matches_torch():
    from torch.nn import functional as F

    from cxr.data.augment import affine_grid

    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(2))
    for h, w in ((7, 9), (32, 32)):
        expected = F.affine_grid(theta, [5, 1, h, w], align_corners=False)
        assert torch.allclose(affine_grid(theta, h, w), expected, atol=1e-6)
