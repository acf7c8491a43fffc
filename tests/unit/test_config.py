"""Typed config: defaults, params.yaml, dotted overrides and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cxr.config import Config, ConfigError, load_config, parse_override

REPO = Path(__file__).resolve().parents[2]


def test_repo_params_load_and_match_the_typed_defaults():
    cfg = load_config(REPO / "params.yaml")
    assert cfg == Config(), "params.yaml drifted from the defaults in config.py"


def test_dotted_overrides_parse_values_as_yaml():
    cfg = Config().override(
        [
            "train.lr=3e-4",
            "train.early_stopping.patience=2",
            "prepare.sizes=[28, 64]",
            "model.image_size=28",
            "data.path=/x/y",
        ]
    )
    assert cfg.train.lr == 3e-4 and cfg.train.early_stopping.patience == 2
    assert cfg.prepare.sizes == [28, 64] and cfg.data.path == "/x/y"
    assert parse_override("train.device=cuda:1") == ("train.device", "cuda:1")


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'"):
        Config().override(["train.lrr=1"])
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"train": {"epochs": 2, "batchsize": 8}}))
    with pytest.raises(ConfigError, match=r"train\.batchsize"):
        load_config(p)


def test_mistyped_value_is_named():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        Config().override({"train.epochs": "many"})
    with pytest.raises(ConfigError, match=r"data\.source"):
        Config().override({"data.source": "imagenet"})


def test_image_size_must_be_prepared():
    with pytest.raises(ConfigError, match="not among prepare.sizes"):
        Config().override({"model.image_size": 224})


def test_override_names_match_dvc_exp_run_set_param(tmp_path):
    """`dvc exp run -S a.b=v` edits params.yaml in place; the same edit must load identically."""
    p = tmp_path / "params.yaml"
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["train"]["lr"] = 0.0005
    p.write_text(yaml.safe_dump(data))
    assert load_config(p) == load_config(REPO / "params.yaml", ["train.lr=0.0005"])


def test_flat_params_for_tracking():
    flat = Config().flat()
    assert flat["train.lr"] == Config().train.lr and "train.augment.rotation_deg" in flat
