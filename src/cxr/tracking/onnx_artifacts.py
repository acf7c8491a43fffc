"""A model's ONNX graph where models live: `cxr export` for a directory or an MLflow URI, and with a version's
artifacts at `cxr register` (cxr.models.onnx_export writes and checks the graph)."""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from cxr.fsutil import atomic_dir
from cxr.models.card import ModelCard
from cxr.models.onnx_export import ExportRefused, export
from cxr.models.onnx_runtime import ONNX_FILE
from cxr.models.predictor import CARD_FILE
from cxr.tracking.uris import ModelRef, ModelUriError, local_model_dir, resolve

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from cxr.config import Config

log = logging.getLogger(__name__)

ONNX_TAG = "onnx_sha256"  # a version's graph: the service refuses another under CXR_RUNTIME=onnx


def export_model(cfg: "Config", model: str | None = None, out: Path | None = None) -> Path:
    """``model.onnx`` for the model at ``model`` (default ``paths.model``), returned. A model directory gets it
    inside (or a copy at ``out`` does); an MLflow URI's artifacts are copied to ``out``, by default a folder beside
    ``paths.model`` named after the version, and the graph goes there."""
    ref, load_uri = resolve(cfg, model or cfg.paths.model)
    source = local_model_dir(load_uri)
    if out is None and Path(load_uri).is_dir():
        return export(source)
    target = Path(out) if out is not None else Path(cfg.paths.model).parent / _folder_name(ref)
    if target.resolve() != source.resolve():
        with atomic_dir(target) as tmp:  # a whole copy or none: a half-copied model would fail its hash check
            shutil.copytree(source, tmp, dirs_exist_ok=True)
    return export(target)


def _folder_name(ref: ModelRef) -> str:
    name = f"{ref.name}-v{ref.version}" if ref.version else ref.name
    return re.sub(r"[^\w.-]+", "-", name).strip("-") or "exported"


def log_onnx(client: "MlflowClient", model_uri: str) -> str | None:
    """The sha256 of the ONNX graph with the logged model at ``model_uri`` (``models:/m-...``), exported and logged
    into its artifacts (beside model.safetensors, with the card that records it) when it has none yet. None, with
    the reason logged, for a model the exporter refuses: it is registered all the same, for the torch runtime."""
    if not model_uri.startswith("models:/m-"):
        log.warning("%s is not a logged model: registered without an ONNX graph", model_uri)
        return None
    import mlflow  # heavy, and only registering needs it here

    with tempfile.TemporaryDirectory(prefix="cxr-onnx-") as tmp:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        found = sorted(p.parent for p in root.rglob(CARD_FILE))
        if not found:
            raise ModelUriError(f"{model_uri} holds no {CARD_FILE}: it was not logged by cxr")
        model_dir = found[0]
        card = ModelCard.from_json((model_dir / CARD_FILE).read_text(), f"{model_uri}/{CARD_FILE}")
        if card.onnx_sha256 and (model_dir / ONNX_FILE).exists():
            return card.onnx_sha256
        try:
            export(model_dir)
        except ExportRefused as exc:
            log.warning("registered without an ONNX graph: %s", exc)
            return None
        model_id, where = model_uri[len("models:/") :].strip("/"), model_dir.relative_to(root).as_posix()
        for name in (ONNX_FILE, CARD_FILE):  # the graph first: a card naming a graph that is not there yet never loads
            client.log_model_artifact(model_id, str(model_dir / name), None if where == "." else where)
        return ModelCard.from_json((model_dir / CARD_FILE).read_text()).onnx_sha256
