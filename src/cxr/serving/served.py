"""What the service serves and how an upload becomes an answer, without any HTTP.

``ServedModel.load()`` finds the model (``$CXR_MODEL_URI``, else ``models:/<mlflow.registered_model>@
<registry.alias>`` from the configured registry), loads it through the one ``Predictor`` that
evaluation uses, and turns uploaded bytes into the response objects of the HTTP API. A registry alias
is resolved to its version once, and that immutable version is what gets loaded, so the version a
response names is the version that answered. src/cxr/serving/service.py only adds HTTP around this.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cxr.config import load_config
from cxr.errors import UserError
from cxr.models.card import ModelCard
from cxr.models.predictor import BrokenModel, ModelLoadError, NonFiniteOutput, Predictor
from cxr.serving.explain import explain
from cxr.serving.input_checks import image_stats, input_warnings, refuse_non_chest
from cxr.tracking.onnx_artifacts import ONNX_TAG
from cxr.tracking.registry import WEIGHTS_TAG, operating_points
from cxr.tracking.uris import ModelRef, is_mlflow_uri, load_predictor, registry_version, resolve

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from cxr.config import Config

log = logging.getLogger(__name__)

MODEL_URI_ENV = "CXR_MODEL_URI"
PARAMS_ENV = "CXR_PARAMS"
WHAT_TO_DO = (
    "Register and promote a model (`cxr register`, then `cxr promote VERSION`), point MLFLOW_TRACKING_URI at "
    f"the registry that has it, or set {MODEL_URI_ENV} to a model directory or MLflow model URI"
)
# Run metrics worth showing in /metadata (the rest are per-epoch training curves).
METRIC_PREFIXES = ("val_", "test_", "best_", "eval_")
# The lineage fields /metadata shows (None when the card has none).
METADATA_LINEAGE = (
    "dataset_hash",
    "source",
    "synthetic",
    "run_id",
    "best_epoch",
    "epochs_trained",
    "git_commit",
    "environment",
)
# What an answered input tells the service's metrics about itself (cxr.serving.monitoring): nothing identifying.
INPUT_META = ("format", "view", "photometric")
REFUSED = 422  # the request was well formed but the image is unusable: the reader says why
NO_VALID_OUTPUT = 503  # the model, not the film, failed (NaN or inf): the service's fault, never a decision
UNKNOWN_SITE = 400  # the request names an operating point this version does not have


class NoModelToServe(UserError):
    """The configured model cannot be found or loaded; the service cannot start."""


def service_config() -> "Config":
    """params.yaml in the working directory (defaults when absent), or the file named by $CXR_PARAMS."""

    path = os.environ.get(PARAMS_ENV)
    return load_config(path) if path else load_config()


def model_uri(cfg: "Config") -> str:
    """$CXR_MODEL_URI, else the configured registry alias (``models:/cxr@champion`` by default)."""
    return os.environ.get(MODEL_URI_ENV) or f"models:/{cfg.mlflow.registered_model}@{cfg.registry.alias}"


def _metrics(load_uri: str, card: ModelCard) -> dict[str, float]:
    """Validation/test metrics of the run behind the model (best effort: never fatal)."""
    training = card.training
    fallback = {"val_auroc": training.val_auroc} if training.val_auroc is not None else {}
    run_id = training.run_id
    if not is_mlflow_uri(load_uri) or not run_id:
        return fallback
    try:
        # mlflow is heavy and only needed for a model that came from MLflow
        from mlflow import MlflowClient

        metrics = MlflowClient().get_run(run_id).data.metrics
    except Exception as exc:  # a registry without run access still serves
        log.warning("metrics of run %s unavailable: %s", run_id, type(exc).__name__)
        return fallback
    return {k: v for k, v in sorted(metrics.items()) if k.startswith(METRIC_PREFIXES)} or fallback


def refusal(message: str, status: int = REFUSED) -> dict[str, Any]:
    return {"error": message, "status": status}


def is_refusal(result: Any) -> bool:
    return isinstance(result, dict) and "error" in result


@dataclass
class Prepared:
    """One decoded upload, ready for the model: its input array, tabular inputs and warnings."""

    x: np.ndarray  # uint8 (S, S): the model's own preprocessing
    tabular: np.ndarray | None  # (n_tabular,) for a fusion model
    warnings: list[str]
    stats: dict[str, float]  # image_stats of x: the warnings and the drift metrics both read them
    meta: dict[str, Any] = field(default_factory=dict)  # the INPUT_META fields of the image


class ServedModel:
    """A Predictor plus what the service says about it (reference, metrics) and about each input.

    The steps are separate so the service can decode uploads in its HTTP process and batch only the
    forward pass in the model process: ``prepare`` (bytes -> Prepared, or a refusal), ``infer`` (a
    batch of Prepared -> probabilities), ``answer`` (the response object). ``predict`` chains them.
    """

    def __init__(
        self,
        predictor: "Predictor",
        ref: ModelRef,
        metrics: dict[str, float] | None = None,
        sites: dict[str, dict[str, Any]] | None = None,
        runtime: str | None = None,
    ) -> None:
        self.predictor = predictor
        self.ref = ref
        self.metrics = metrics or {}
        self.sites = sites or {}  # site name -> operating point ({threshold, rule, ...}), from the registry
        self.runtime = runtime or predictor.runtime  # a weightless copy is told the model service's

    @classmethod
    def load(
        cls,
        cfg: "Config | None" = None,
        uri: str | Path | None = None,
        device: str = "cpu",
        precision: str = "fp32",
        runtime: str = "torch",
    ) -> "ServedModel":
        """The model at ``uri`` (a directory or MLflow URI; default: ``model_uri(cfg)``), tracking store from cfg,
        run by ``runtime`` ("torch"; "onnx": its model.onnx in onnxruntime; "auto": onnx where it can)."""

        cfg = cfg or service_config()
        try:
            ref, load_uri = resolve(cfg, str(uri or model_uri(cfg)))
            predictor = load_predictor(load_uri, device=device, precision=precision, runtime=runtime)
            entry = check_registered_weights(ref, predictor.card, predictor.runtime)
        except BrokenModel as exc:  # changed, unloadable or NaN weights: serving another model is not the fix
            raise NoModelToServe(str(exc)) from None
        except ModelLoadError as exc:  # a bad URI, no such registered model, no store, not a cxr model
            raise NoModelToServe(f"{exc}. {WHAT_TO_DO}.") from None
        # the site operating points come from the version entry read once for the check
        sites = operating_points(entry) if entry is not None else {}
        served = cls(predictor, ref, _metrics(load_uri, predictor.card), sites)
        log.info(
            "serving %s version %s (%s): %s, labels %s, %s, %s runtime",
            ref.name,
            ref.version,
            ref.uri,
            predictor.card.arch,
            predictor.labels,
            precision,
            predictor.runtime,
        )
        return served

    def card(self) -> dict[str, Any]:
        """Everything but the weights: enough for ``without_weights`` to prepare inputs and answer."""
        return {
            "card": self.predictor.card.to_dict(),
            "ref": self.ref.to_dict(),
            "metrics": self.metrics,
            "precision": self.predictor.precision,
            "runtime": self.runtime,
            "sites": self.sites,
        }

    @classmethod
    def without_weights(cls, card: dict[str, Any]) -> "ServedModel":
        """The same preprocessing and answers as the model behind ``card``, with no weights: ``infer``
        must then run where the weights are (the model service). Built from the model service's own
        card, it can never disagree with it about version, labels or threshold."""

        return cls(
            Predictor(
                WeightsElsewhere(),
                ModelCard.from_dict(card["card"], "the model service's card"),
                precision=card["precision"],
            ),
            ModelRef(**card["ref"]),
            card["metrics"],
            card.get("sites"),
            card.get("runtime"),
        )

    def metadata(self) -> dict[str, Any]:
        card = self.predictor.card.to_dict()
        training = card["training"]
        return {
            "model": self.ref.to_dict(),
            "task": self.predictor.task,
            "labels": self.predictor.labels,
            "threshold": self.predictor.threshold,
            "threshold_method": card.get("threshold_method"),
            "threshold_augmented_copies": card["threshold_augmented_copies"],
            "architecture": card["architecture"],
            "preprocess": card["preprocess"],
            "read_limits": card["read_limits"],
            "precision": self.predictor.precision,
            "runtime": self.runtime,
            "training": {k: training.get(k) for k in METADATA_LINEAGE},
            "metrics": self.metrics,
            "operating_points": self.sites,
            "out_of_distribution": self.ood_check(),
        }

    def ood_check(self) -> dict[str, Any]:
        """How the model tells films unlike its training films (``checked: false`` for a model without it)."""
        check = self.predictor.card.ood
        if check is None:
            return {"checked": False}
        fields = ("method", "threshold", "val_pass_rate", "fit_images")
        return {"checked": True, **{k: getattr(check, k) for k in fields}, "stages": len(check.stages)}

    def _decode(self, data: bytes, label: str = "upload") -> tuple[Any, np.ndarray]:
        """Read, refuse non-chest DICOMs, preprocess. UserError for anything unusable."""

        # never the client's file name: it may name the patient; a non-chest header is refused before decoding
        image = self.predictor.read(data, name=label, header_check=lambda header: refuse_non_chest(header, label))
        return image, self.predictor.prepare_input(image)

    def prepare(self, data: bytes) -> "Prepared | dict[str, Any]":
        """Bytes -> Prepared, or a refusal (the reader's message) for anything unusable."""

        try:
            image, x = self._decode(data)
        except UserError as exc:
            return refusal(str(exc))
        except Exception as exc:  # a decoder bug must cost one answer, not the worker
            return _unexpected(exc)
        tabular = self.predictor.tabular_for([image])
        meta = {k: image.meta.get(k) for k in INPUT_META}
        stats = image_stats(x)
        return Prepared(x, None if tabular is None else tabular[0], input_warnings(image.meta, x, stats), stats, meta)

    def infer(self, batch: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> list[dict[str, Any]]:
        """(input array, tabular) pairs -> per pair, as JSON crosses from the model process: ``prob`` (binary) or
        the probability vector, the out-of-distribution score ``ood`` and the members' ``spread`` (or None)."""
        xs = np.stack([x for x, _ in batch])
        tabular = np.stack([t for _, t in batch]) if batch and batch[0][1] is not None else None
        scores = self.predictor.score(xs, tabular)
        return [{"prob": np.asarray(p).tolist(), **scores.of(i)} for i, p in enumerate(scores.probs)]

    def site_refusal(self, site: str | None) -> dict[str, Any] | None:
        """A refusal naming the known sites when ``site`` is not an operating point of this version, else None."""
        if site is None or site in self.sites:
            return None
        if not self.predictor.task.binary:
            return refusal(f"site {site!r}: site operating points exist for binary models only", UNKNOWN_SITE)
        known = ", ".join(sorted(self.sites)) or "none (store one with `cxr evaluate-external --calibrate --save-site`)"
        return refusal(
            f"unknown site {site!r} for {self.ref.name} version {self.ref.version or '-'}; known: {known}", UNKNOWN_SITE
        )

    def answer(
        self, prepared: Prepared, scored: dict[str, Any], site: str | None = None, abstain: bool = True
    ) -> dict[str, Any]:
        """The response, or a refusal when the model gave no finite probability; with ``site`` (checked by ``site_refusal``) the decision is at that site's threshold,
        and ``operating_point`` says so. A film out of distribution is answered ``abstain`` unless ``abstain``
        is False (the caller asked for the decision anyway)."""
        threshold = None if site is None else self.sites[site]["threshold"]
        try:
            decision = self.predictor.describe(
                scored["prob"],
                threshold,
                ood=scored["ood"],
                spread=scored["spread"],
                decide_out_of_distribution=not abstain,
            )
        except NonFiniteOutput as exc:
            log.error("model %s version %s: %s", self.ref.name, self.ref.version, exc)
            return refusal(str(exc), NO_VALID_OUTPUT)
        if site is not None:
            decision["operating_point"] = site
        return {**decision, "model": self.ref.to_dict(), "warnings": prepared.warnings}

    def predict(self, uploads: Sequence[bytes], site: str | None = None, abstain: bool = True) -> list[dict[str, Any]]:
        """One response (or refusal) per upload; the usable ones go through the model as one batch."""
        unknown = self.site_refusal(site)
        if unknown is not None:
            return [unknown for _ in uploads]
        results: list[Any] = [self.prepare(data) for data in uploads]
        usable = [i for i, r in enumerate(results) if isinstance(r, Prepared)]
        if usable:
            scored = self.infer([(results[i].x, results[i].tabular) for i in usable])
            for i, one in zip(usable, scored):
                results[i] = self.answer(results[i], one, site, abstain)
        return results

    def explain(self, data: bytes, label: str | None = None) -> dict[str, Any]:
        """Grad-CAM PNG plus the lung share, or a refusal. ``lung_share`` is None (never 0) when the
        Grad-CAM is empty or no lung mask could be estimated; ``warnings`` then says which."""
        try:
            image, x = self._decode(data)
            result = explain(self.predictor, image, label)
            scores = self.predictor.score(x[None], self.predictor.tabular_for([image]))
            said = self.predictor.describe(scores.probs[0], **scores.of(0))  # what predict would answer
        except UserError as exc:
            return refusal(str(exc))
        except NonFiniteOutput as exc:
            return refusal(str(exc), NO_VALID_OUTPUT)
        except Exception as exc:
            return _unexpected(exc)
        warnings = input_warnings(image.meta, x) + result.warnings
        if "abstain_reason" in said:
            warnings.append(said["abstain_reason"])
        return {
            **result.summary(),
            "png": result.png,
            "model": self.ref.to_dict(),
            "ood": said["ood"],
            "warnings": warnings,
        }


def check_registered_weights(ref: ModelRef, card: ModelCard, runtime: str = "torch") -> "ModelVersion | None":
    """A registered version must serve the weights it was registered with: its ``weights_sha256`` tag (and under
    the ONNX runtime its ``onnx_sha256``) and the card (which the loader checked against the files) must agree; a
    version registered before the tag passes. Returns the registry's entry of the version (None: not registered)."""
    if ref.version is None:
        return None
    entry = registry_version(f"models:/{ref.name}/{ref.version}")
    tags = entry.tags if entry is not None else {}
    checked = [(WEIGHTS_TAG, "weights", card.weights_sha256)]
    checked += [(ONNX_TAG, "ONNX graph", card.onnx_sha256)] if runtime == "onnx" else []
    for tag, what, held in checked:
        registered = tags.get(tag)
        if registered is not None and registered != held:
            raise BrokenModel(
                f"{ref.name} version {ref.version} was registered with {what} sha256 {registered[:12]}…, but its "
                f"artifacts hold {(held or 'unhashed')[:12]}…: the stored model was changed after registration"
            )
    return entry


class WeightsElsewhere(torch.nn.Module):
    """Stands in for the network in a weightless Predictor; calling it is a bug, so it says so."""

    def forward(self, *args: Any) -> Any:
        raise RuntimeError("this Predictor has no weights: inference runs in the model service (ServedModel.infer)")


def _unexpected(exc: Exception) -> dict[str, Any]:
    # The exception text may quote header values, so only its type is logged and returned.
    log.error("could not process an upload: %s", type(exc).__name__, exc_info=False)
    return refusal(
        f"upload: could not process this image ({type(exc).__name__}); "
        "if it is a valid radiograph, report it with the file"
    )
