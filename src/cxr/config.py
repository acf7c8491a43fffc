"""Typed configuration loaded from params.yaml.

Every section is a pydantic model with ``extra="forbid"`` so an unknown or mistyped key fails with
a message naming it. Dotted overrides (``train.lr=3e-4``) use the same names as ``dvc exp run -S``.
Loading a config has no side effects: no folders are created and no tracking URI is set.
"""

from __future__ import annotations

import contextvars
import difflib
import functools
import threading
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cxr.errors import UserError

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(UserError):
    """A user-facing configuration problem (unknown key, wrong type, unreadable file)."""


# The keys read while :func:`record_reads` is active in this context; None (the normal case): nothing is recorded.
_READS: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("cxr_config_reads", default=None)


def _not_a_read(validator: Callable[..., Any]) -> Callable[..., Any]:
    """For a model validator reading its values: checking a config is not a stage reading it (record_reads)."""

    @functools.wraps(validator)
    def unrecorded(*args: Any, **kwargs: Any) -> Any:
        token = _READS.set(None)
        try:
            return validator(*args, **kwargs)
        finally:
            _READS.reset(token)

    return unrecorded


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    def model_dump(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        dumped = super().model_dump(*args, **kwargs)
        if _READS.get() is not None:  # a section dumped (e.g. into a card) is a read of every key it holds
            _record_dump(self, dumped)
        return dumped


class ProjectConfig(Section):
    seed: int = 42


class PathsConfig(Section):
    raw: Path = Path("data/raw")
    prepared: Path = Path("data/prepared")
    model: Path = Path("models/cxr")
    reports: Path = Path("reports")


class SyntheticConfig(Section):
    n_patients: int = Field(400, ge=4)
    images_per_patient_max: int = Field(3, ge=1)
    size: int = Field(256, ge=32)
    prevalence: float = Field(0.4, gt=0, lt=1)
    # 0 = consolidations obvious, 1 = barely visible; chosen so the default model gets a realistic AUROC
    difficulty: float = Field(0.4, ge=0, le=1)
    jpeg2000_fraction: float = Field(0.1, ge=0, le=1)
    monochrome1_fraction: float = Field(0.3, ge=0, le=1)
    seed: int = 0


class DataConfig(Section):
    source: Literal["synthetic", "medmnist", "kermany", "rsna", "covid_radiography", "nih", "manifest"] = "synthetic"
    # Where the raw source lives (folder, .npz or CSV); unused for the synthetic source.
    path: str | None = None
    # Copy source files into paths.raw so DVC versions them; false keeps them in place (huge sets).
    copy_images: bool = True
    synthetic: SyntheticConfig = SyntheticConfig()
    medmnist_flavor: Literal["pneumoniamnist", "chestmnist"] = "pneumoniamnist"
    medmnist_size: int = 28
    nih_mode: Literal["multilabel", "first_finding"] = "multilabel"
    covid_balance: bool = False
    # manifest source: the label column and task
    manifest_task: Literal["binary", "multiclass", "multilabel"] = "binary"
    positive_label: str | None = None


class ImagingConfig(Section):
    min_side: int = Field(16, ge=1)
    max_pixels: int = Field(60_000_000, ge=1)
    max_bytes: int = Field(200 * 1024 * 1024, ge=1)


class PreprocessConfig(Section):
    sizes: list[int] = [64]
    resize: Literal["squash", "pad", "crop"] = "squash"
    clip_percentiles: tuple[float, float] = (0.5, 99.5)

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if not v or any(s < 8 for s in v):
            raise ValueError("prepare.sizes needs at least one size >= 8")
        return sorted(set(v))


class SplitConfig(Section):
    val: float = Field(0.15, ge=0, lt=1)
    test: float = Field(0.15, ge=0, lt=1)
    # keep a source's official split when it has one
    use_official: bool = True


class PrepareConfig(PreprocessConfig):
    split: SplitConfig = SplitConfig()
    max_failure_fraction: float = Field(0.05, ge=0, le=1)
    workers: int = Field(2, ge=1)


# train.augment.strength is chosen per source on validation: 3.0 for real films (PneumoniaMNIST's validation split,
# benchmarks/defaults_protocol.py), 1.0 for the synthetic default's 64-px films (benchmarks/synthetic_defaults.py:
# at 3.0 they sat at chance for 10-20 epochs, and whether 30 epochs reached 0.9 depended on seed and CPU).
REAL_FILMS_AUGMENT_STRENGTH = 3.0


class AugmentConfig(Section):
    strength: float = Field(1.0, ge=0)  # multiplies the ranges below; the synthetic source's (see above)
    rotation_deg: float = 7.0
    shift: float = 0.06
    scale: float = 0.08
    brightness: float = 0.15
    contrast: float = 0.15
    hflip: bool = False


class ForestConfig(Section):
    # model.arch: random_forest (scikit-learn on the baselines' 16x16 pooled pixels). Chosen on PneumoniaMNIST's
    # validation split by benchmarks/forest_defaults.py: the cheapest within 0.002 AUROC of the best (0.9894 vs 0.9907)
    n_estimators: int = Field(100, ge=1)
    max_depth: int | None = Field(16, ge=1)  # None: grow until leaves are pure or at min_samples_leaf
    min_samples_leaf: int = Field(5, ge=1)


class ModelConfig(Section):
    arch: str = "simple_cnn"
    weights: str = "none"  # imagenet | none | <path to a state_dict or safetensors file>
    image_size: int = 64
    dropout: float = Field(0.3, ge=0, lt=1)
    width: int = Field(32, ge=4)
    tabular: bool = False
    tta_views: int = Field(0, ge=0)  # K > 0: the saved model averages K fixed views drawn from train.augment
    tta_strength: float = Field(1.0, gt=0)  # the views' augmentation strength (instead of train.augment's)
    # Transfer: none | backbone | N (the backbone's first N blocks) held fixed, their BatchNorm statistics too
    freeze: Literal["none", "backbone"] | Annotated[int, Field(ge=1)] = "none"
    unfreeze_epoch: int | None = Field(None, ge=2)  # from this epoch on everything trains (None: never)
    forest: ForestConfig = ForestConfig()  # the random_forest baseline's trees

    @model_validator(mode="after")
    @_not_a_read
    def _unfreeze_needs_freeze(self) -> "ModelConfig":
        if self.unfreeze_epoch is not None and self.freeze == "none":
            raise ValueError("model.unfreeze_epoch needs model.freeze (backbone or a number of blocks)")
        return self


class EarlyStoppingConfig(Section):
    patience: int = Field(10, ge=1)
    min_delta: float = 0.0
    # What picks the saved epoch and stops training. val_auroc: the clean validation films.
    # augmented_val_auroc: validation seen through train.augment (tune.objective_copies seeded copies,
    # the tuning yardstick), which follows films from elsewhere better than in-distribution validation does.
    monitor: Literal["val_auroc", "augmented_val_auroc"] = "val_auroc"


class TrainConfig(Section):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.9
    scheduler: Literal["onecycle", "cosine", "plateau", "none"] = "onecycle"
    imbalance: Literal["weight", "sample", "none"] = "weight"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    backbone_lr_scale: float = Field(1.0, gt=0)  # the backbone's learning rate as a share of lr (the head's)
    # Exponential moving average of the weights, used for validation and the saved model (0 = off).
    ema_decay: float = Field(0.995, ge=0, lt=1)
    # Networks trained with seeds seed, seed+1, ...; the saved model averages their logits (1 = one network).
    ensemble: int = Field(1, ge=1)
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    augment: AugmentConfig = AugmentConfig()
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # bfloat16 autocast for the forward passes of training and validation. auto: on CUDA only. bf16 on a CPU
    # with AMX can be faster or slower depending on the network and input size (measurements: benchmarks/README.md).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    deterministic: bool = True
    max_train_batches: int | None = None  # cap for smoke runs


class EvaluateConfig(Section):
    # youden_kernel: Youden's J on kernel-smoothed validation scores (cut-off less decided by a few films);
    # youden: on the empirical ROC curve; sensitivity: the highest threshold reaching target_sensitivity.
    # This default and threshold_augmented_copies' were chosen on validation by benchmarks/defaults_protocol.py.
    threshold: Literal["youden_kernel", "youden", "sensitivity"] = "sensitivity"
    # k > 0: the rule runs on k copies of the validation split seen through train.augment (as in training):
    # scores under the acquisition variation the model was trained to tolerate, not only on clean in-distribution
    # films, where normals score near 0. 0: on the validation films as they are.
    threshold_augmented_copies: int = Field(0, ge=0)
    target_sensitivity: float = Field(0.9, gt=0, lt=1)
    bootstrap: int = Field(1000, ge=0)
    ci: float = Field(0.95, gt=0, lt=1)
    calibration_bins: int = Field(10, ge=2)


class OodConfig(Section):
    # feature_mahalanobis: distances of a film's feature statistics from the training films' (cxr.models.ood),
    # chosen in benchmarks/ood.py; none: no check (answers never abstain)
    method: Literal["feature_mahalanobis", "none"] = "feature_mahalanobis"
    val_pass_rate: float = Field(0.95, gt=0, le=1)  # the threshold lets this share of validation films through
    max_fit_images: int = Field(10000, ge=10)  # training films the statistics are fitted on (a seeded sample above)


class MlflowConfig(Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: str = "mlartifacts"
    experiment: str = "cxr"
    registered_model: str = "cxr"
    enabled: bool = True


class SpaceParam(Section):
    """One dimension of the search space, keyed in ``tune.space`` by its dotted config name."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    @_not_a_read
    def _complete(self) -> "SpaceParam":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty `choices` list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.type} parameter needs low < high")
        elif self.log and self.low <= 0:
            raise ValueError("a log-scale parameter needs low > 0")
        return self


DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "train.lr": {"type": "float", "low": 0.0003, "high": 0.01, "log": True},
    "train.weight_decay": {"type": "float", "low": 1.0e-6, "high": 0.01, "log": True},
    "train.batch_size": {"type": "categorical", "choices": [32, 64, 128]},
    "model.arch": {"type": "categorical", "choices": ["simple_cnn", "resnet18"]},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "model.width": {"type": "categorical", "choices": [16, 32, 48]},
    "train.augment.strength": {"type": "float", "low": 0.0, "high": 3.0},
}


class TuneConfig(Section):
    study: str = "cxr-tune"
    storage: str = "sqlite:///optuna.db"
    direction: Literal["maximize", "minimize"] = "maximize"
    sampler_seed: int = 0
    # What a trial is judged on (and the pruner is fed every epoch): AUROC on `objective_copies` copies of validation
    # seen through the configured train.augment, one fixed yardstick for all trials; or plain validation AUROC.
    objective: Literal["augmented_val_auroc", "val_auroc"] = "augmented_val_auroc"
    objective_copies: int = Field(5, ge=1)
    pruner: Literal["median", "percentile", "hyperband", "none"] = "median"
    # percentile pruner: a trial must stay within the top `keep_percentile` % of earlier trials at each epoch
    keep_percentile: float = Field(25.0, gt=0, lt=100)
    startup_trials: int = Field(
        5, ge=0
    )  # random trials before TPE, and trials before the median/percentile pruner acts
    pruner_startup_trials: int | None = Field(
        None, ge=0
    )  # finished trials before the pruner acts, if not startup_trials
    warmup_epochs: int = Field(2, ge=0)  # epochs before a trial may be pruned
    # A worker that dies (kill -9) stops its heartbeat; its trial is marked failed after the grace period.
    heartbeat_interval: int = Field(10, ge=1)
    grace_period: int = Field(30, ge=2)
    max_consecutive_failures: int = Field(3, ge=1)
    log_models: bool = True  # every completed trial's model in MLflow, so the best one can be registered as is
    space: dict[str, SpaceParam] = Field(default_factory=lambda: {k: SpaceParam(**v) for k, v in DEFAULT_SPACE.items()})


class RegistryConfig(Section):
    promote_margin: float = Field(0.0, ge=0)
    alias: str = "champion"
    require_ood: bool = False  # promote refuses a version without an out-of-distribution check (False: warns)


class Config(Section):
    project: ProjectConfig = ProjectConfig()
    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()
    imaging: ImagingConfig = ImagingConfig()
    prepare: PrepareConfig = PrepareConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    ood: OodConfig = OodConfig()
    mlflow: MlflowConfig = MlflowConfig()
    tune: TuneConfig = TuneConfig()
    registry: RegistryConfig = RegistryConfig()

    @model_validator(mode="after")
    @_not_a_read
    def _size_is_prepared(self) -> "Config":
        if self.model.image_size not in self.prepare.sizes:
            raise ValueError(
                f"model.image_size={self.model.image_size} is not among prepare.sizes={self.prepare.sizes}"
            )
        return self

    def override(self, overrides: dict[str, Any] | list[str] | None) -> "Config":
        """A new config with dotted overrides applied (and validated as a whole)."""
        data = self.model_dump(mode="json")
        for key, value in _as_pairs(overrides):
            _set_dotted(data, key, value)
        return _validate(data, "overrides")

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, for MLflow params."""
        return flatten(self.model_dump(mode="json"))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value) with the value parsed as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _as_pairs(overrides: dict[str, Any] | list[str] | None) -> list[tuple[str, Any]]:
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return list(overrides.items())
    return [parse_override(o) for o in overrides]


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict; unknown names are left for validation to report."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _did_you_mean(key: str) -> str:
    """The closest known key, so a typo names its fix; otherwise where the keys are listed."""
    known = flatten(Config().model_dump(mode="json"))
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else " (`cxr config` lists every key)"


def _validate(data: dict[str, Any], origin: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                lines.append(f"unknown config key {loc!r}{_did_you_mean(loc)}")
            else:
                lines.append(f"{loc or 'config'}: {err['msg']}")
        raise ConfigError(f"invalid configuration ({origin}): " + "; ".join(lines)) from None


def load_config(path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Load params.yaml (defaults where absent) and apply dotted overrides."""
    path = Path(path)
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections")
    elif path != DEFAULT_PARAMS:
        raise ConfigError(f"config file {path} does not exist")
    for key, value in _as_pairs(overrides):
        _set_dotted(data, key, value)
    return _validate(data, str(path))


# --- which config keys code reads --------------------------------------------------------------------------------


@contextmanager
def record_reads() -> Iterator[set[str]]:
    """Record the dotted keys of config values read in this context (``train.lr``, ``prepare.split.val``).

    A value read from any section instance counts (copies and ``model_copy`` included: a section class sits at one
    place in :class:`Config`), as does ``model_dump`` of a section below the root (it holds every key it dumps);
    reading a section itself, dumping the whole config (``flat``, ``override``, logging to MLflow) and validation
    do not. Values in a ``dict`` of sections are keyed ``*`` (``tune.space.*.low``). Contexts nest: an inner
    recording's keys are also the outer one's. Reads in other threads or processes are not seen (contextvars).

    Zero cost otherwise: the attribute hook is on :class:`Section` only while some recording is active.
    """
    global _HOOK_USERS
    with _HOOK_LOCK:
        if _HOOK_USERS == 0:
            type.__setattr__(Section, "__getattribute__", _recording_getattribute)
        _HOOK_USERS += 1
    outer = _READS.get()
    reads: set[str] = set()
    token = _READS.set(reads)
    try:
        yield reads
    finally:
        _READS.reset(token)
        if outer is not None:
            outer |= reads
        with _HOOK_LOCK:
            _HOOK_USERS -= 1
            if _HOOK_USERS == 0:
                type.__delattr__(Section, "__getattribute__")


_HOOK_LOCK = threading.Lock()
_HOOK_USERS = 0


def _recording_getattribute(self: Section, name: str) -> Any:
    value = object.__getattribute__(self, name)
    if name[0] != "_" and _READS.get() is not None:
        _record_field(self, name, value)
    return value


def _section_types(annotation: Any) -> Iterator[tuple[type[Section], bool]]:
    """The Section classes an annotation holds, each with whether it sits in a dict (keyed ``*``)."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        yield annotation, False
        return
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is dict and len(args) == 2:
        for cls, _ in _section_types(args[1]):
            yield cls, True
    else:
        for arg in args:
            yield from _section_types(arg)


def _section_prefixes(root: type[Section]) -> dict[type[Section], tuple[str, ...]]:
    """Section class -> its dotted place(s) in the config ("" for the root)."""
    found: dict[type[Section], list[str]] = {root: [""]}
    todo: list[tuple[type[Section], str]] = [(root, "")]
    while todo:
        cls, prefix = todo.pop()
        for name, info in cls.__pydantic_fields__.items():
            for sub, in_dict in _section_types(info.annotation):
                place = f"{prefix}{name}." + ("*." if in_dict else "")
                if place not in found.setdefault(sub, []):
                    found[sub].append(place)
                    todo.append((sub, place))
    return {cls: tuple(places) for cls, places in found.items()}


_PREFIXES: dict[type[Section], tuple[str, ...]] = {}


def _prefixes(cls: type[Section]) -> tuple[str, ...]:
    if not _PREFIXES:
        _PREFIXES.update(_section_prefixes(Config))
    # a section class outside Config's tree: a key no params entry covers, so a check reports it
    return _PREFIXES.get(cls, (f"<{cls.__name__}>.",))


def _record_field(section: Section, name: str, value: Any) -> None:
    reads = _READS.get()
    cls = type(section)
    if reads is None or name not in cls.__pydantic_fields__ or isinstance(value, Section):
        return  # a method, a property, or a section (its values are recorded when they are read)
    for prefix in _prefixes(cls):
        reads.add(prefix + name)


def _record_dump(section: Section, dumped: Any) -> None:
    reads = _READS.get()
    prefixes = [p for p in _prefixes(type(section)) if p]
    if reads is None or not prefixes or not isinstance(dumped, dict):
        return  # the whole config (flat, override, MLflow params) is not a read of every key
    for key in flatten(dumped):
        for prefix in prefixes:
            reads.add(prefix + key)
