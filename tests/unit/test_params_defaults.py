"""Config keys have one owner: params.yaml spells out every key with the value src/cxr/config.py defaults it to.

Also the recorder of which keys code reads (``record_reads``), which tests/integration/test_dvc_graph.py runs the
DVC stages under to check dvc.yaml's params.
"""

from __future__ import annotations

import copy
import pickle
import typing
from pathlib import Path

import pytest
import yaml

from cxr.config import AugmentConfig, Config, Section, flatten, load_config, record_reads

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def _leaf_fields(cls: type[Section], prefix: str = "") -> list[str]:
    """Dotted names of the fields that are not sections themselves (``tune.space`` is one value: a dict)."""
    out = []
    for name, info in cls.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, Section):
            out += _leaf_fields(sub, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def _has(tree: dict, key: str) -> bool:
    node: typing.Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_params_yaml_names_every_key():
    raw = yaml.safe_load(PARAMS.read_text())
    missing = [key for key in _leaf_fields(Config) if not _has(raw, key)]
    assert not missing, f"params.yaml lacks {missing}: DVC cannot track a key it does not list (nor -S set it)"


def test_params_yaml_values_are_the_config_defaults():
    defaults = flatten(Config().model_dump(mode="json"))
    params = flatten(load_config(PARAMS).model_dump(mode="json"))  # validated: unknown keys already fail here
    differ = {k: (defaults.get(k), params.get(k)) for k in sorted(defaults.keys() | params.keys())}
    differ = {k: v for k, v in differ.items() if v[0] != v[1]}
    assert not differ, "params.yaml and config.py defaults differ (key: (default, params.yaml)):\n" + "\n".join(
        f"  {k}: {d!r} != {p!r}" for k, (d, p) in differ.items()
    )


def test_record_reads_names_the_dotted_keys_read():
    cfg = Config()
    name = "min_side"
    with record_reads() as reads:
        assert cfg.train.lr == 3e-3
        _ = cfg.prepare.split.val, cfg.tune.space["train.lr"].low, getattr(cfg.imaging, name)
        _ = cfg.evaluate  # a section alone is no read
    assert reads == {"train.lr", "prepare.split.val", "tune.space", "tune.space.*.low", "imaging.min_side"}
    _ = cfg.train.epochs  # after the block: not recorded
    assert "train.epochs" not in reads


def test_copies_and_section_dumps_count_whole_config_dumps_and_validation_do_not():
    cfg = Config()
    with record_reads() as reads:
        views = cfg.train.augment.model_copy(update={"strength": 1.0})
        _ = views.hflip  # a copy of train.augment is still train.augment
        _ = AugmentConfig(strength=3).shift
        cfg.prepare.split.model_dump()  # a section dumped (into a card) holds every key in it
        cfg.flat()
        cfg.model_dump(mode="json")
        cfg.override({"train.lr": 1e-3})  # dumps and validates the whole config (image_size in sizes)
        load_config(PARAMS)
        copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg)), repr(cfg), cfg == Config()
    assert reads == {
        "train.augment.hflip",
        "train.augment.shift",
        "prepare.split.val",
        "prepare.split.test",
        "prepare.split.use_official",
    }


def test_recordings_nest_and_leave_the_config_working():
    cfg = Config()
    with record_reads() as outer:
        _ = cfg.model.arch
        with record_reads() as inner:
            _ = cfg.train.epochs
        cfg.train.epochs = 3  # validate_assignment still works under the recorder
        with pytest.raises(ValueError):
            cfg.train.epochs = 0
    assert inner == {"train.epochs"} and outer == {"model.arch", "train.epochs"}
    assert cfg.train.epochs == 3
    assert "__getattribute__" not in vars(Section)  # no hook left behind: reads cost nothing when not recording
