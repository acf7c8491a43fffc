"""Prometheus metrics of what the service is shown and what it answers, beside BentoML's request counts
and latencies on the same ``/metrics``.

The HTTP worker(s) record them. ``bentoml serve`` starts every worker with ``PROMETHEUS_MULTIPROC_DIR``
set, so prometheus_client (in multiprocess mode) writes each process's values to files there, and
BentoML's ``/metrics`` sums them over all workers. The metrics are created on first use (``monitor()``),
in the process that records them, not at import (the ``bentoml serve`` parent and tests import this module).

Every label takes values from a small fixed set: a refusal or warning is classified into a reason,
never exported as its text (which can hold per-image numbers); nothing about the patient is a label.

Reading them (PromQL), e.g. the share of MONOCHROME1 DICOMs and the median drift over the last hour::

    sum(rate(cxr_inputs_total{photometric="MONOCHROME1"}[1h])) / sum(rate(cxr_inputs_total{format="dicom"}[1h]))
    histogram_quantile(0.5, sum by (le, stat) (rate(cxr_input_drift_zscore_bucket[1h])))

The drift z-scores are signed, so prometheus_client exports their buckets and count but no sum.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from cxr.models.card import IntensityStats
from cxr.serving.input_checks import FRONTAL_VIEWS
from cxr.task import Task

if TYPE_CHECKING:
    from cxr.serving.served import Prepared, ServedModel

log = logging.getLogger(__name__)

UNIT_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 ... 1.0: probabilities and grey levels
Z_BUCKETS = (-4.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0)
MIN_SPREAD = 1e-3  # a training set of near-identical images must not make every input look like drift
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"})
NO_HEADER = "N/A"  # PNG/JPEG: the format carries no view or photometric interpretation

# First match wins. The phrases are those of cxr.imaging, input_checks and the service
# (tests/unit/test_monitoring.py sends the real messages through).
REFUSAL_REASONS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (reason, re.compile(pattern))
    for reason, pattern in (
        ("too_large", r"upload limit|byte limit|exceeds the limit|too large to decode"),
        ("too_many_files", r"files in one request"),
        ("too_small", r"below the minimum side"),
        ("empty", r"empty file|image is constant"),
        ("not_an_image", r"not a (readable )?DICOM, PNG or JPEG|DICOM has no pixel data"),
        ("not_chest", r"chest radiographs only"),
        (
            "unsupported",
            r"multi-frame|colour DICOM|float pixel data|bit pixel data is outside|no PhotometricInterpretation"
            r"|grayscale frame",
        ),
        ("corrupt", r"truncated or corrupt|cannot decode|NaN or infinite|missing Rows"),
        ("internal_error", r"could not process this image"),
    )
)
# Every match counts: one "far from chest radiographs" warning can name several statistics.
WARNING_REASONS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (reason, re.compile(pattern))
    for reason, pattern in (
        ("view_missing", r"^view unknown"),
        ("non_frontal_view", r"^non-frontal view"),
        ("unusual_brightness", r"[:;] mean [-\d.]+ outside"),
        ("unusual_contrast", r"[:;] contrast \(std\)"),
        ("centre_not_brighter", r"centre not brighter than the lung fields"),
    )
)
OTHER = "other"
MODEL_THRESHOLD = "model"  # the operating_point label of a decision at the model's own threshold


def refusal_reason(message: str) -> str:
    return next((reason for reason, pattern in REFUSAL_REASONS if pattern.search(message)), OTHER)


def warning_reasons(message: str) -> list[str]:
    return [reason for reason, pattern in WARNING_REASONS if pattern.search(message)] or [OTHER]


def input_kind(meta: dict[str, Any]) -> dict[str, str]:
    """Bounded labels for an input: its format, DICOM view position and photometric interpretation."""
    fmt = str(meta.get("format") or OTHER)
    if fmt != "dicom":
        return {"format": fmt, "view": NO_HEADER, "photometric": NO_HEADER}
    photometric = (meta.get("photometric") or "").strip().upper()
    return {
        "format": fmt,
        "view": _view(meta.get("view")),
        "photometric": photometric if photometric in ("MONOCHROME1", "MONOCHROME2") else "OTHER",
    }


def _view(value: str | None) -> str:
    view = (value or "").strip().upper()
    if view in FRONTAL_VIEWS:
        return view
    if view in LATERAL_VIEWS:
        return "LATERAL"
    return "OTHER" if view else "MISSING"


def drift_z(stats: dict[str, float], reference: IntensityStats) -> dict[str, float]:
    """How many training standard deviations this input's grey-level mean and std lie from the training images'."""
    return {
        stat: (stats[stat] - moments.average) / max(moments.spread, MIN_SPREAD)
        for stat, moments in (("mean", reference.mean), ("std", reference.std))
    }


def predicted_labels(prediction: Any) -> list[str]:
    """The class(es) predicted at the threshold: one for binary/multiclass, every positive one (or none) for multilabel."""
    if isinstance(prediction, list):
        return [str(p) for p in prediction] or ["none"]
    return [str(prediction)]


def watched_scores(task: Task | str, labels: list[str], probabilities: dict[str, float]) -> dict[str, float]:
    """Binary: the positive class's probability only (the other is its complement); else every label's."""
    return {labels[1]: probabilities[labels[1]]} if Task(task).binary else dict(probabilities)


def _never_fails(record: Callable[..., None]) -> Callable[..., None]:
    """A metric that cannot be written (say, its multiprocess directory was removed) costs the metric, not the answer."""

    @functools.wraps(record)
    def guarded(*args: Any, **kwargs: Any) -> None:
        try:
            record(*args, **kwargs)
        except Exception as exc:
            log.warning("metrics not recorded: %s", type(exc).__name__)

    return guarded


class Monitor:
    """The service's own metrics, registered in ``registry`` (prometheus_client's default: what BentoML exposes)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.predictions = Counter(
            "cxr_predictions",
            "Answers by the class predicted, model version and operating point (model: its own threshold; else a site).",
            ["prediction", "model_version", "operating_point"],
            registry=registry,
        )
        self.scores = Histogram(
            "cxr_score",
            "Predicted probability per label (binary: the positive class only).",
            ["label", "model_version"],
            buckets=UNIT_BUCKETS,
            registry=registry,
        )
        self.warnings = Counter(
            "cxr_input_warnings", "Warnings attached to answered inputs, by reason.", ["reason"], registry=registry
        )
        self.refusals = Counter(
            "cxr_refusals", "Uploads refused (HTTP 4xx, any endpoint), by reason.", ["reason"], registry=registry
        )
        self.inputs = Counter(
            "cxr_inputs",
            "Answered inputs by format, DICOM view position and photometric interpretation (N/A: PNG/JPEG).",
            ["format", "view", "photometric"],
            registry=registry,
        )
        self.intensity = Histogram(
            "cxr_input_intensity",
            "Mean and standard deviation of each preprocessed input's grey levels (0-1).",
            ["stat"],
            buckets=UNIT_BUCKETS,
            registry=registry,
        )
        self.drift = Histogram(
            "cxr_input_drift_zscore",
            "Input grey-level mean and std in training standard deviations from the training images' (model card).",
            ["stat"],
            buckets=Z_BUCKETS,
            registry=registry,
        )
        self.ood = Counter(
            "cxr_out_of_distribution",
            "Answered films out of distribution, by outcome: abstained, or decided because the caller asked.",
            ["outcome", "model_version"],
            registry=registry,
        )

    @_never_fails
    def answered(self, served: "ServedModel", prepared: "Prepared", answer: dict[str, Any]) -> None:
        version = str(served.ref.version or "unregistered")
        predictor = served.predictor
        point = str(answer.get("operating_point") or MODEL_THRESHOLD)  # a site's name: set by whoever stored it
        for label in predicted_labels(answer["prediction"]):
            self.predictions.labels(label, version, point).inc()
        for label, p in watched_scores(predictor.task, predictor.labels, answer["probabilities"]).items():
            self.scores.labels(label, version).observe(p)
        for message in prepared.warnings:
            for reason in warning_reasons(message):
                self.warnings.labels(reason).inc()
        self.inputs.labels(**input_kind(prepared.meta)).inc()
        ood = answer.get("ood", {})
        if ood.get("checked") and not ood.get("in_distribution"):
            self.ood.labels("abstained" if "abstain_reason" in answer else "decided", version).inc()
        self.observe_intensity(prepared.stats, predictor.card.train_intensity)

    def observe_intensity(self, stats: dict[str, float], reference: IntensityStats | None) -> None:
        for stat in ("mean", "std"):
            self.intensity.labels(stat).observe(stats[stat])
        if reference is not None:  # cards written before cxr recorded training intensities have none
            for stat, z in drift_z(stats, reference).items():
                self.drift.labels(stat).observe(z)

    @_never_fails
    def refused(self, message: str) -> None:
        self.refusals.labels(refusal_reason(message)).inc()


@functools.cache
def monitor() -> Monitor:
    """This process's Monitor, created on first use (see the module docstring)."""
    return Monitor()
