"""ONNX export: ``model.onnx`` beside ``model.safetensors``, kept only if it answers as the torch network does.

The graph takes what the Predictor feeds its network, the film scaled to [0, 1] ``(B, 1, S, S)`` (and ``tabular``
``(B, n)`` for a fusion model), and returns what the Predictor reads from one forward pass: ``logits``, the members'
/ views' logits ``(S, B, K)``, then per OOD stage the channel means and standard deviations (float64, computed with
:func:`cxr.models.ood.channel_moments` as FeatureTap computes them). So :class:`cxr.models.onnx_runtime.OnnxPredictor`
gives the same probabilities, spread and out-of-distribution score. The card records the file's sha256
(``onnx_sha256``) and the graph's metadata the weights it came from; loading checks both.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cxr.errors import UserError
from cxr.fsutil import atomic_write_text, sha256_file
from cxr.models.onnx_runtime import ONNX_FILE, WEIGHTS_KEY, OnnxPredictor, session
from cxr.models.ood import channel_moments, stage_sums
from cxr.models.predictor import CARD_FILE, Predictor, probe_films, stacked_logits

OPSET = 17
TOLERANCE = 1e-4  # the most a probability may differ between the graph and torch on the check films
OOD_TOLERANCE = 1e-3  # relative, of the OOD score: its float32 sums are added in another order
TTA_REFUSAL = (  # measured: its views' stage summaries came out wrong while the (random-init) probabilities agreed
    "test-time augmentation resamples its views with in-place writes the ONNX exporter does not trace faithfully; "
    "serve it with CXR_RUNTIME=torch"
)


class ExportRefused(UserError):
    """The model has no faithful ONNX graph; the message says why."""


class Graph(nn.Module):
    """The network as the exported graph runs it: logits of every member / view, then each stage's summaries."""

    def __init__(self, model: nn.Module, stages: list[str]) -> None:
        super().__init__()
        self.model, self.stages = model, stages

    def forward(self, x: Tensor, tabular: Tensor | None = None) -> tuple[Tensor, ...]:
        calls: dict[str, list[tuple[Tensor, Tensor]]] = {s: [] for s in self.stages}
        hooks = [  # summarised at once, as FeatureTap does: a later in-place operation may change the map
            self.model.get_submodule(s).register_forward_hook(
                lambda _m, _i, out, s=s: calls[s].append(channel_moments(*stage_sums(out)))
            )
            for s in self.stages
        ]
        try:
            logits = stacked_logits(self.model, x, tabular)
        finally:
            for hook in hooks:
                hook.remove()
        return (logits, *[m for s in self.stages for m in _stage_summary(calls[s])])


def _stage_summary(moments: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """A stage's channel means and standard deviations, averaged over its calls (as FeatureTap averages them)."""
    return torch.stack([m[0] for m in moments]).mean(0), torch.stack([m[1] for m in moments]).mean(0)


def export(path: str | Path) -> Path:
    """Write ``path/model.onnx`` for the model in ``path``, check it against torch, record its sha256 in the card.

    Returns the file; ExportRefused (one line) for a model that cannot be exported faithfully, and then nothing
    is written."""
    path = Path(path)
    predictor = Predictor.from_dir(path)
    refuse_unexportable(predictor.card.architecture, predictor.spec.size)
    target, tmp = path / ONNX_FILE, path / f".{ONNX_FILE}.tmp-{os.getpid()}"
    try:
        write_graph(predictor, tmp)
        check_parity(predictor, OnnxPredictor(predictor.model, predictor.card, session(tmp), predictor.ood))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    card = predictor.card.model_copy(update={"onnx_sha256": sha256_file(target)})
    atomic_write_text(path / CARD_FILE, card.to_json())
    return target


def refuse_unexportable(spec: dict, size: int) -> None:
    """ExportRefused for what the exporter would get wrong or fail on, said before it tries."""
    arch = spec.get("arch")
    if arch == "tta":
        raise ExportRefused(f"cannot export a test-time-augmentation model to ONNX: {TTA_REFUSAL}")
    pool = spec.get("pool")  # the classical baselines average-pool the film to pool x pool
    if pool and size % int(pool):
        raise ExportRefused(
            f"cannot export the {arch} baseline at {size} px to ONNX: it pools to {pool} x {pool}, and the ONNX "
            "exporter pools only to a divisor of the input size; serve it with CXR_RUNTIME=torch"
        )
    members = spec.get("members", [])
    for member, side in zip(members, spec.get("input_sizes") or [size] * len(members)):  # each at the size it sees
        refuse_unexportable(member, side)


def write_graph(predictor: Predictor, out: Path) -> None:
    """Trace the network (legacy TorchScript exporter: it needs only the onnx package) and write it to ``out``."""
    import onnx  # only `cxr export` writes graphs: a second of import spared everywhere else

    stages = predictor.card.ood.stages if predictor.ood is not None else []
    size, n_tab = predictor.spec.size, predictor.card.n_tabular
    args = (torch.zeros(2, 1, size, size),) + ((torch.zeros(2, n_tab),) if n_tab else ())
    inputs = ["image"] + (["tabular"] if n_tab else [])
    outputs = ["logits"] + [f"{s}.{m}" for s in stages for m in ("mean", "std")]
    axes = {name: {0: "batch"} for name in inputs + outputs} | {"logits": {1: "batch"}}  # (S, B, K)
    names = {"input_names": inputs, "output_names": outputs, "dynamic_axes": axes}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings: parity decides
        try:
            torch.onnx.export(
                Graph(predictor.model, stages), args, str(out), opset_version=OPSET, dynamo=False, **names
            )
        except Exception as exc:  # an operator the exporter does not know: say which model and why, once
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ExportRefused(f"cannot export {predictor.card.arch} to ONNX: {first}") from None
    model = onnx.load(str(out))
    onnx.helper.set_model_props(model, {WEIGHTS_KEY: predictor.card.weights_sha256 or ""})
    onnx.save(model, str(out))


def check_films(size: int, n: int = 6) -> np.ndarray:
    """The probe films, then noise: films unlike each other, to compare two runtimes on (no patient data)."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (n - 2, size, size)).astype(np.uint8)
    return np.concatenate([probe_films(size), noise])


def parity(reference: Predictor, other: Predictor, films: np.ndarray) -> dict[str, float]:
    """The largest |difference| of probabilities and the largest relative difference of OOD scores on ``films``."""
    a, b = reference.score(films), other.score(films)
    out = {"probability": float(np.max(np.abs(a.probs - b.probs)))}
    if a.ood is not None:
        out["ood_relative"] = float(np.max(np.abs(a.ood - b.ood) / np.maximum(np.abs(a.ood), 1.0)))
    if a.spread is not None:
        out["spread"] = float(np.max(np.abs(a.spread - b.spread)))
    return out


def check_parity(reference: Predictor, exported: Predictor) -> None:
    """Refuse a graph whose answers on :func:`check_films` differ from torch's by more than the tolerances."""
    found = parity(reference, exported, check_films(reference.spec.size))
    if found["probability"] > TOLERANCE or found.get("ood_relative", 0.0) > OOD_TOLERANCE:
        raise ExportRefused(
            f"the ONNX graph of {reference.card.arch} answers unlike torch (max |Δ probability| "
            f"{found['probability']:.2g}, OOD score {found.get('ood_relative', 0.0):.2g} relative); nothing written, "
            "serve it with CXR_RUNTIME=torch"
        )
