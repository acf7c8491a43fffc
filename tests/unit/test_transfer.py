"""Transfer learning: model.freeze holds the backbone (or its first N blocks) bit-identical, BatchNorm statistics
included, until model.unfreeze_epoch; train.backbone_lr_scale gives the backbone its own learning rate."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cxr.config import Config
from cxr.data.loader import PreparedData
from cxr.errors import UserError
from cxr.models import build_model
from cxr.training.callbacks import Callback
from cxr.training.fit import load_training_data
from cxr.training.freeze import Frozen
from cxr.training.loop import train_network
from cxr.training.setup import make_optimizer, make_scheduler

SIZE = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> PreparedData:
    """48 random films (a brighter centre for pneumonia), 32 of them for training."""
    root = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(0)
    labels = ["normal", "pneumonia"] * 24
    images = rng.integers(0, 200, (48, SIZE, SIZE), dtype=np.uint8)
    images[1::2, 4:12, 4:12] += 50
    card = {"source": "synthetic", "task": "binary", "classes": ["normal", "pneumonia"], "sizes": [SIZE],
            "preprocess": {"resize": "squash", "clip_percentiles": [0.5, 99.5]}}  # fmt: skip
    (root / "card.json").write_text(json.dumps(card))
    manifest = pd.DataFrame(
        {"image": [f"{i}.png" for i in range(48)], "label": labels, "split": ["train"] * 32 + ["val"] * 16,
         "pixel_hash": [f"h{i}" for i in range(48)], "patient_key": [f"p{i}" for i in range(48)],
         "view": "PA", "sex": "F", "age": 50.0}
    )  # fmt: skip
    manifest.to_csv(root / "manifest.csv", index=False)
    np.save(root / f"images_{SIZE}.npy", images)
    return PreparedData(root, SIZE)


def config(**overrides) -> Config:
    base = {"prepare.sizes": [SIZE], "model.image_size": SIZE, "model.width": 4, "train.batch_size": 8,
            "train.epochs": 2, "mlflow.enabled": False}  # fmt: skip
    return Config().override({**base, **overrides})


class Snapshots(Callback):
    """The validated model's tensors at the start and end of every epoch (its BatchNorm buffers too)."""

    def __init__(self) -> None:
        self.start: dict[int, dict[str, torch.Tensor]] = {}
        self.end: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch_start(self, state) -> None:
        self.start[state.epoch] = {k: v.clone() for k, v in state.model.state_dict().items()}

    def on_epoch_end(self, state) -> None:
        self.end[state.epoch] = {k: v.clone() for k, v in state.model.state_dict().items()}


def same(a: dict, b: dict, prefix: str) -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys, prefix
    return all(torch.equal(a[k], b[k]) for k in keys)


@pytest.mark.parametrize("ema_decay", [0.0, 0.995])
def test_frozen_backbone_stays_bit_identical_while_the_head_trains(data, ema_decay) -> None:
    seen = Snapshots()
    member = train_network(config(**{"model.freeze": "backbone", "train.ema_decay": ema_decay}), data, 0,
                           torch.device("cpu"), [seen])  # fmt: skip
    before, after = seen.start[1], member.model.state_dict()  # the saved weights (the EMA's when on)
    assert any("running_mean" in k for k in before if k.startswith("backbone."))  # BatchNorm statistics are checked
    assert same(before, after, "backbone.")
    assert not same(before, after, "head.")
    assert same(before, seen.end[2], "backbone.")  # every epoch's validated weights, not only the best


def test_unfreeze_epoch_trains_the_backbone_from_that_epoch(data) -> None:
    seen = Snapshots()
    cfg = config(**{"model.freeze": "backbone", "model.unfreeze_epoch": 2, "train.ema_decay": 0.0})
    train_network(cfg, data, 0, torch.device("cpu"), [seen])
    assert same(seen.start[1], seen.start[2], "backbone.")  # held through epoch 1
    assert not same(seen.start[2], seen.end[2], "backbone.stem.")  # trained in epoch 2, first layer included
    assert not same(seen.start[2], seen.end[2], "backbone.stem.1.running_mean")  # BatchNorm in training mode again


def test_freezing_the_first_blocks_holds_them_and_trains_the_rest(data) -> None:
    seen = Snapshots()
    member = train_network(config(**{"model.freeze": 2, "train.ema_decay": 0.0, "train.epochs": 1}), data, 0,
                           torch.device("cpu"), [seen])  # fmt: skip
    before, after = seen.start[1], member.model.state_dict()
    assert same(before, after, "backbone.stem.") and same(before, after, "backbone.blocks.0.")  # simple_cnn's 1, 2
    assert not same(before, after, "backbone.blocks.1.")


def test_frozen_batchnorm_stays_in_eval_mode_after_train() -> None:
    model = build_model("resnet18", 1)
    frozen = Frozen(model, 1)  # conv1, bn1 and layer1
    model.train()
    frozen.hold()
    assert not model.backbone.bn1.training and not model.backbone.layer1[0].bn1.training
    assert model.backbone.layer2[0].bn1.training and model.backbone.training and model.head.training
    assert not model.backbone.conv1.weight.requires_grad and model.backbone.layer2[0].conv1.weight.requires_grad
    frozen.release()
    assert all(p.requires_grad for p in model.parameters()) and frozen.names == []


def test_backbone_lr_scale_gives_the_backbone_two_groups_at_the_scaled_rate() -> None:
    model = build_model("simple_cnn", 1, width=4)
    cfg = config(**{"train.backbone_lr_scale": 0.1, "train.lr": 1e-3})
    opt = make_optimizer(model, cfg)
    scaled = [g for g in opt.param_groups if g["lr"] == pytest.approx(1e-4)]
    assert len(opt.param_groups) == 4 and len(scaled) == 2
    backbone = {id(p) for p in model.backbone.parameters()}
    assert {id(p) for g in scaled for p in g["params"]} == backbone
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)  # the head's: what the history logs as lr
    sched, _ = make_scheduler(opt, cfg, steps_per_epoch=8)  # onecycle keeps the ratio all along
    for _ in range(5):
        opt.step()
        sched.step()
        assert scaled[0]["lr"] == pytest.approx(0.1 * opt.param_groups[0]["lr"])
    assert len(make_optimizer(model, config()).param_groups) == 2  # the default: as before


def test_impossible_transfer_settings_fail_before_any_work(tmp_path) -> None:
    missing = {"paths.prepared": str(tmp_path / "nothing")}  # the check comes before the data is read
    with pytest.raises(UserError, match=r"model.freeze=7 but simple_cnn has 6 blocks \(stem, blocks.0"):
        load_training_data(config(**{"model.freeze": 7, **missing}))
    small = {"prepare.sizes": [32], "model.image_size": 32, "model.arch": "inception_v3", **missing}
    with pytest.raises(UserError, match="inception_v3 needs inputs of at least 75 px"):
        load_training_data(config(**small))
