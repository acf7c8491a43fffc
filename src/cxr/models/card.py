"""The model card: what a trained model is besides its weights, as one typed, versioned record (model.json).

Training writes it; the Predictor, evaluation, serving and the registry read it, and nothing rebuilds it
from the current config. Its preprocessing and read limits are the prepared data's (card.json), so a model
serves exactly the input it was trained on. Loading validates it and refuses a schema it does not know.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cxr.errors import UserError
from cxr.imaging import ReadLimits
from cxr.preprocess import PreprocessSpec
from cxr.task import Task

SCHEMA = "cxr-model/2"
# cxr-model/1 cards hold the same fields (written before the card was typed); they load as they are.
READABLE = (SCHEMA, "cxr-model/1")
Threshold = float | list[float] | None


class ModelCardError(UserError):
    """A model.json that is not a card this version of cxr can read."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class Preprocessing(_Record):
    size: int = Field(ge=8)
    resize: Literal["squash", "pad", "crop"]
    clip_percentiles: tuple[float, float]
    version: int = 1

    def spec(self) -> PreprocessSpec:
        return PreprocessSpec(self.size, self.resize, self.clip_percentiles, self.version)

    @classmethod
    def of(cls, spec: PreprocessSpec) -> "Preprocessing":
        return cls(**spec.to_dict())


class Limits(_Record):
    min_side: int = Field(ge=1)
    max_pixels: int = Field(ge=1)
    max_bytes: int = Field(ge=1)

    def read_limits(self) -> ReadLimits:
        return ReadLimits(self.min_side, self.max_pixels, self.max_bytes)


class Member(_Record):
    """One network of an ensemble: a seed of ``train.ensemble``, or a model combined by ``cxr ensemble`` (then its
    architecture, input size, origin and weight, and its validation AUROC as the ensemble feeds it)."""

    val_auroc: float
    seed: int | None = None
    best_epoch: int | list[int] | None = None
    arch: str | None = None
    image_size: int | None = None
    source: str | None = None
    run_id: str | None = None
    weights_sha256: str | None = None
    weight: float | None = None


class Environment(_Record):
    """The software and machine a model was trained on: what a rerun needs to reproduce its numbers."""

    python: str
    torch: str
    cpu: str
    cpu_capability: str  # the vector instructions torch's CPU kernels use (AVX2, AVX512): they change float rounding
    threads: int  # torch's intra-op threads
    gpu: str | None = None
    lock_sha256: str | None = None  # requirements.lock of the cxr source tree (None: cxr not run from one)
    lock_matches: bool | None = None  # every package pinned in the lock is installed at its pinned version


class Lineage(_Record):
    """Where the model came from: the data it saw, the run that trained it, what training reached."""

    dataset_hash: str
    source: str
    synthetic: bool = False
    run_id: str | None = None
    git_commit: str | None = None
    best_epoch: int | list[int] | None = None
    val_auroc: float | None = None
    epochs_trained: int | None = None
    members: list[Member] | None = None  # an ensemble's networks
    environment: Environment | None = None  # absent from cards written before it existed


class Moments(_Record):
    average: float
    spread: float = Field(ge=0)  # standard deviation


class IntensityStats(_Record):
    """Grey levels (0-1) of the preprocessed training images: the average and spread over the training
    split of each image's mean and standard deviation. The service measures its inputs against them."""

    images: int = Field(ge=1)
    mean: Moments
    std: Moments


class OodCheck(_Record):
    """The model's out-of-distribution check (cxr.models.ood): what it summarises, and where it draws the line."""

    method: Literal["feature_mahalanobis"]
    stages: list[str]  # modules whose outputs are summarised (channel means and standard deviations)
    dims: list[int]  # size of each summary: two per stage
    classes: int = Field(ge=1)  # class-conditional Gaussians (one: unconditional)
    threshold: float  # scores above it are out of distribution
    val_pass_rate: float = Field(ge=0, le=1)  # share of validation films at or under the threshold
    fit_images: int = Field(ge=1)  # training films the statistics were fitted on


class ModelCard(_Record):
    format: str = SCHEMA
    architecture: dict[str, Any]  # the network's own spec: models.build.build_from_spec rebuilds it
    preprocess: Preprocessing
    read_limits: Limits
    task: Task
    labels: list[str]
    threshold: Threshold = None
    threshold_method: str | None = None
    threshold_augmented_copies: int = 0
    training: Lineage
    train_intensity: IntensityStats | None = None  # absent from cards written before it existed
    ood: OodCheck | None = None  # None: the model has no out-of-distribution check (the linear baseline, old cards)
    weights_sha256: str | None = None  # of model.safetensors, checked at every load; None: a card written before it
    onnx_sha256: str | None = None  # of model.onnx (`cxr export`), checked when the ONNX runtime loads it; None: none

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        return self.preprocess.spec()

    @property
    def limits(self) -> ReadLimits:
        return self.read_limits.read_limits()

    @property
    def arch(self) -> str:
        return str(self.architecture.get("arch", "?"))

    @property
    def n_tabular(self) -> int:
        return int(self.architecture.get("n_tabular", 0))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def with_run(self, **lineage: Any) -> "ModelCard":
        """The same card with lineage fields added (the run id once a run exists)."""
        return self.model_copy(update={"training": self.training.model_copy(update=lineage)})

    @classmethod
    def from_dict(cls, data: Any, where: str = "model.json") -> "ModelCard":
        if not isinstance(data, dict):
            raise ModelCardError(f"{where} is not a model card (a JSON object)")
        found = data.get("format")
        if found not in READABLE:
            raise ModelCardError(
                f"{where} has model card format {found!r}; this cxr reads {', '.join(READABLE)}. "
                "Retrain the model with this version (`cxr train`), or use the cxr version that wrote it"
            )
        try:
            return cls.model_validate({**data, "format": SCHEMA})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'card'}: {e['msg']}" for e in exc.errors()[:5])
            raise ModelCardError(f"{where} is not a valid model card ({problems})") from None

    @classmethod
    def from_json(cls, text: str, where: str = "model.json") -> "ModelCard":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelCardError(f"{where} is not valid JSON ({exc})") from None
        return cls.from_dict(data, where)
