"""The model card a training run writes, and the check that the config agrees with the prepared arrays.

Preprocessing and read limits come from the prepared data's card.json, never from the current config, so
the model serves exactly the input it was trained on; a config that disagrees is refused, naming both values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from cxr.data.loader import PreparedData
from cxr.errors import UserError
from cxr.models.card import IntensityStats, Limits, Lineage, ModelCard, Moments, OodCheck, Preprocessing

if TYPE_CHECKING:
    from cxr.config import Config


class PreparedMismatch(UserError):
    """The training config asks for preprocessing the prepared arrays were not made with."""


def check_prepared(cfg: "Config", data: PreparedData) -> None:
    """Refuse to train when prepare.resize / clip_percentiles or imaging.* disagree with card.json (a
    model.image_size that was not prepared is refused by PreparedData)."""
    if "read_limits" not in data.card:
        raise PreparedMismatch(
            f"{data.root} was prepared by an older cxr (no read limits in card.json): run `cxr prepare`"
        )
    made, limits = data.card.get("preprocess", {}), data.card["read_limits"]
    pairs = {
        "prepare.resize": (cfg.prepare.resize, made.get("resize")),
        "prepare.clip_percentiles": (list(cfg.prepare.clip_percentiles), list(made.get("clip_percentiles", []))),
        **{f"imaging.{k}": (getattr(cfg.imaging, k), v) for k, v in limits.items()},
    }
    wrong = [
        f"{k}={a!r} but the arrays in {data.root} were prepared with {b!r}" for k, (a, b) in pairs.items() if a != b
    ]
    if wrong:
        raise PreparedMismatch(
            "; ".join(wrong) + ". Run `cxr prepare` with these settings (`dvc repro` does), or drop the override"
        )


def model_card(
    cfg: "Config",
    data: PreparedData,
    architecture: dict[str, Any],
    threshold: Any,
    ood: OodCheck | None,
    **lineage: Any,
) -> ModelCard:
    """model.json: everything needed to use the weights on a raw image, plus lineage."""
    made = data.card["preprocess"]
    return ModelCard(
        architecture=architecture,
        preprocess=Preprocessing(size=data.size, resize=made["resize"], clip_percentiles=made["clip_percentiles"]),
        read_limits=Limits(**data.card["read_limits"]),
        task=data.task,
        labels=data.classes,
        threshold=threshold,
        threshold_method=cfg.evaluate.threshold,
        threshold_augmented_copies=cfg.evaluate.threshold_augmented_copies,
        training=Lineage(
            dataset_hash=data.card["dataset_hash"],
            source=data.card["source"],
            synthetic=data.card.get("synthetic", False),
            **lineage,
        ),
        train_intensity=intensity_stats(data.images, data.split("train")),
        ood=ood,
    )


def intensity_stats(images: np.ndarray, index: np.ndarray, chunk: int = 256) -> IntensityStats | None:
    """Per-image grey-level mean and std of uint8 ``images[index]`` (as 0-1), summarised; None for no images."""
    if len(index) == 0:
        return None
    index, means, stds = np.sort(index), [], []
    for start in range(0, len(index), chunk):  # chunks: a memory-mapped split need not fit in memory
        x = np.asarray(images[index[start : start + chunk]], dtype=np.float32).reshape(-1, images[0].size)
        x /= 255.0
        means.append(x.mean(axis=1))
        stds.append(x.std(axis=1))
    m, s = np.concatenate(means), np.concatenate(stds)
    return IntensityStats(
        images=len(m),
        mean=Moments(average=float(m.mean()), spread=float(m.std())),
        std=Moments(average=float(s.mean()), spread=float(s.std())),
    )
