"""The one resolver of model URIs: what a model location names, and the Predictor behind it.

A model location is a local model directory (``models/cxr``) or an MLflow URI: ``models:/NAME@ALIAS``,
``models:/NAME/VERSION`` or ``runs:/<run id>/model``. Serving, evaluation, tuning, the benchmarks and
the tests all go through here, so a URI means the same thing everywhere. The models layer only reads
directories (``Predictor.from_dir``); fetching from MLflow happens here.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr.models.onnx_runtime import predictor_class
from cxr.models.predictor import CARD_FILE, ModelLoadError, Predictor
from cxr.tracking.runs import configured_uri, tracking_uri, use_store

if TYPE_CHECKING:
    import torch
    from mlflow.entities.model_registry import ModelVersion

    from cxr.config import Config

REGISTERED = re.compile(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))/?")


class ModelUriError(ModelLoadError):
    """A model location that names nothing loadable; the message says what was asked for and why."""


@dataclass(frozen=True)
class ModelRef:
    """Who answered: the registered name and version (None for a directory or a run), and the URI asked for."""

    name: str
    version: str | None
    uri: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_mlflow_uri(uri: str | Path) -> bool:
    return ":/" in str(uri)


def use_store_of(cfg: "Config") -> str:
    """Point mlflow at the configured tracking store and registry without writing to them; returns its URI.

    A missing sqlite file is refused: mlflow would silently create an empty store there."""
    uri, given = tracking_uri(cfg), configured_uri(cfg)
    db = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
    if db is not None and not db.exists():
        # A relative path is relative to the working directory, which for a built bento is the bento's
        # own folder: say where it looked.
        source = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "mlflow.tracking_uri"
        where = "" if given == uri else f", i.e. {db}; use an absolute path"
        raise ModelUriError(f"no MLflow store at {given} (from {source}{where})")
    use_store(uri)
    return uri


def resolve(cfg: "Config | None", uri: str | Path) -> tuple[ModelRef, str]:
    """(the reference to report, the URI to load it from) for a directory or MLflow URI.

    ``models:/NAME@ALIAS`` is resolved to its version once, and the immutable ``models:/NAME/VERSION``
    is what gets loaded, so the version reported is the version that answers. With ``cfg`` mlflow is
    first pointed at its store; without, the store this process already uses is asked."""
    uri = str(uri)
    if Path(uri).is_dir():
        path = Path(uri).resolve()
        return ModelRef(path.name, None, str(path)), str(path)
    if not is_mlflow_uri(uri):
        raise ModelUriError(f"model {uri!r} is neither a model directory nor an MLflow URI (models:/NAME@ALIAS)")
    store = use_store_of(cfg) if cfg is not None else None
    if not uri.startswith("models:/"):
        return ModelRef(uri, None, uri), uri
    # mlflow is heavy and only needed for registry URIs
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    spec = uri[len("models:/") :]
    name, at, alias = spec.partition("@")
    try:
        if at:
            version = MlflowClient().get_model_version_by_alias(name, alias).version
        else:
            name, _, version = spec.partition("/")
            if not version.isdigit():  # a stage name: load as given
                return ModelRef(name, None, uri), uri
            MlflowClient().get_model_version(name, version)
    except MlflowException as exc:
        reason = exc.message.splitlines()[0]
        where = store or mlflow.get_tracking_uri()
        raise ModelUriError(f"no model {uri} in the registry at {where} ({reason})") from None
    return ModelRef(name, str(version), uri), f"models:/{name}/{version}"


def registry_version(uri: str) -> "ModelVersion | None":
    """The registered model version behind ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` in the
    store this process uses, else None (another kind of URI, or no such version)."""
    match = REGISTERED.fullmatch(str(uri))
    if not match:
        return None
    # mlflow is heavy and only needed for registry URIs
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, alias, number = match.groups()
    client = MlflowClient()
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException:
        return None


def local_model_dir(uri: str | Path) -> Path:
    """The model directory behind ``uri``: the directory itself, or MLflow's artifacts downloaded (to its
    cache) from the store this process uses, searched for the cxr model card."""
    if Path(uri).is_dir():
        return Path(uri)
    if not is_mlflow_uri(uri):
        raise ModelUriError(f"model {str(uri)!r} is neither a model directory nor an MLflow URI (models:/NAME@ALIAS)")
    # mlflow is heavy and only needed for MLflow URIs
    import mlflow

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(uri)))
    except Exception as exc:  # registry/tracking errors: say what was asked for and why it failed
        raise ModelUriError(f"cannot fetch {uri} from MLflow ({mlflow.get_tracking_uri()}): {exc}") from None
    found = sorted(p.parent for p in local.rglob(CARD_FILE))
    if not found:
        raise ModelUriError(f"{uri} holds no {CARD_FILE}: it was not logged by cxr")
    return found[0]


def load_predictor(
    uri: str | Path, device: str | torch.device = "cpu", precision: str = "fp32", runtime: str = "torch"
) -> Predictor:
    """The Predictor of a local model directory or an MLflow URI (``models:/cxr@champion``, ``runs:/<id>/model``),
    running in ``runtime`` ("torch"; "onnx": the model's model.onnx in onnxruntime; "auto": onnx where it can)."""
    path = local_model_dir(uri)
    return predictor_class(runtime, path, device, precision).from_dir(path, device, precision)
