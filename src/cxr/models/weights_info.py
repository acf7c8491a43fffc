"""The JSON beside an imported weights file: its normalisation, label order and where it came from.

``cxr import-weights`` writes ``NAME.json`` beside ``NAME.safetensors``; :func:`cxr.models.weights.load_weights`
reads it when it is there, so a network built with ``model.weights=NAME.safetensors`` normalises its input as the
weights were trained to expect (TorchXRayVision: pixels scaled to [-1024, 1024]). A JSON that describes another
file, or another architecture, is refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cxr.fsutil import atomic_write_text, sha256_file
from cxr.models.networks import ModelError

SCHEMA = "cxr-imported-weights/1"


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    sha256: str
    kind: str  # the checkpoint's pickled class (e.g. torchxrayvision.models.DenseNet), or "state dict"


class WeightsInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["cxr-imported-weights/1"] = SCHEMA
    arch: str
    weights_sha256: str  # of the .safetensors beside this file
    norm_mean: float
    norm_std: float = Field(gt=0)
    in_channels: int = Field(1, ge=1)  # of the source's first convolution (3: summed over RGB when loaded)
    labels: list[str] | None = None  # the source head's output order ("": an output it was not trained on)
    op_threshs: list[float | None] | None = None  # TorchXRayVision's operating points per output (None: NaN)
    source: Source

    @field_validator("norm_mean", "norm_std")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be finite")
        return v


def info_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def write_info(weights: Path, info: WeightsInfo) -> Path:
    path = info_path(weights)
    atomic_write_text(path, json.dumps(info.model_dump(mode="json"), indent=2, allow_nan=False) + "\n")
    return path


def read_info(weights: Path, arch: str) -> WeightsInfo | None:
    """The JSON beside ``weights``, checked against that file and ``arch``; None when there is none (or it is not
    one ``cxr import-weights`` wrote)."""
    path = info_path(weights)
    if not path.is_file() or Path(weights).suffix.lower() != ".safetensors":
        return None
    try:
        raw = json.loads(path.read_text())
    except (ValueError, OSError):
        return None  # someone else's file that happens to share the name
    if not isinstance(raw, dict) or raw.get("format") != SCHEMA:
        return None
    try:
        info = WeightsInfo.model_validate(raw)
    except ValidationError as exc:
        raise ModelError(f"{path} is a damaged cxr import-weights description: {str(exc).splitlines()[0]}") from None
    if info.weights_sha256 != sha256_file(Path(weights)):
        raise ModelError(f"{path} describes another file than {weights}: convert again with `cxr import-weights`")
    if info.arch != arch:
        raise ModelError(
            f"{weights} holds {info.arch} weights (per {path.name}), not {arch}: set model.arch={info.arch}"
        )
    return info
