"""The ONNX runtime: a Predictor whose forward pass runs ``model.onnx`` (written by ``cxr export``) in onnxruntime.

Everything else is the Predictor's own: preprocessing, the activation, thresholds, answers, and the
out-of-distribution score (the graph returns the stages' summaries FeatureTap would take). The torch network is
loaded as well, checked as always, for Grad-CAM. ``model.onnx`` must be the file the card's ``onnx_sha256`` names,
exported from the weights the card names; anything else is refused at load. CPU and fp32 only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr.errors import UserError
from cxr.fsutil import sha256_file
from cxr.models.card import ModelCard
from cxr.models.ood import OodDetector
from cxr.models.predictor import BrokenModel, ModelLoadError, Predictor, load_checked, read_card

ONNX_FILE = "model.onnx"
WEIGHTS_KEY = "cxr.weights_sha256"  # the graph's metadata: the weights it was exported from


RUNTIMES = ("torch", "onnx", "auto")


def predictor_class(
    runtime: str, path: str | Path | None = None, device: str | torch.device = "cpu", precision: str = "fp32"
) -> type[Predictor]:
    """The Predictor that runs the model in ``path`` in ``runtime``: "torch", "onnx", or "auto": onnx where it can
    run (CPU, fp32) and the model has a graph recorded in its card (benchmarks/README.md: on 2 idle Xeon cores
    1.02-1.42x torch's served requests/s), else torch."""
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if runtime == "auto":
        runs_here = torch.device(device).type == "cpu" and precision == "fp32"
        has_graph = path is not None and (Path(path) / ONNX_FILE).exists() and read_card(path).onnx_sha256
        runtime = "onnx" if runs_here and has_graph else "torch"
    return OnnxPredictor if runtime == "onnx" else Predictor


class OnnxPredictor(Predictor):
    """The Predictor with ``run_network`` in an onnxruntime session."""

    runtime = "onnx"

    def __init__(self, model: torch.nn.Module, card: ModelCard, onnx_session: Any, ood: OodDetector | None = None):
        super().__init__(model, card, "cpu", "fp32", ood)
        self.session = onnx_session

    @classmethod
    def from_dir(cls, path: str | Path, device: str | torch.device = "cpu", precision: str = "fp32") -> "OnnxPredictor":
        """The model in ``path`` with its ``model.onnx``, both checked against the card, then probed."""
        if torch.device(device).type != "cpu" or precision != "fp32":
            raise UserError(
                f"the ONNX runtime runs on the CPU in fp32 (asked: {device}, {precision}); use CXR_RUNTIME=torch for those"
            )
        path = Path(path)
        card, model, ood = load_checked(path)
        onnx_session = session(check_onnx_digest(card, path / ONNX_FILE))
        exported_from = onnx_session.get_modelmeta().custom_metadata_map.get(WEIGHTS_KEY)
        if exported_from != card.weights_sha256:
            raise BrokenModel(
                f"{path / ONNX_FILE} was exported from other weights than {path.name}'s; export it again (`cxr export`)"
            )
        predictor = cls(model, card, onnx_session, ood)
        predictor.probe()
        return predictor

    def run_network(self, x: torch.Tensor, t: torch.Tensor | None) -> tuple[torch.Tensor, list[np.ndarray]]:
        feeds = {"image": np.ascontiguousarray(x.cpu().numpy())}
        if t is not None:
            feeds["tabular"] = np.ascontiguousarray(t.cpu().numpy())
        logits, *stats = self.session.run(None, feeds)
        return torch.from_numpy(logits), stats


def check_onnx_digest(card: ModelCard, onnx_path: Path) -> Path:
    """The graph must be the one ``cxr export`` recorded in the card (a missing one says how to make it)."""
    if not onnx_path.exists():
        raise ModelLoadError(f"no {ONNX_FILE} beside the model in {onnx_path.parent}; make it with `cxr export`")
    if card.onnx_sha256 is None:
        raise BrokenModel(f"{onnx_path} is not recorded in the model's card; export it again (`cxr export`)")
    found = sha256_file(onnx_path)
    if found != card.onnx_sha256:
        raise BrokenModel(
            f"{onnx_path} is not the graph this model was exported with (sha256 {found[:12]}…, its card says "
            f"{card.onnx_sha256[:12]}…): it was changed or corrupted; export it again (`cxr export`)"
        )
    return onnx_path


def session(onnx_path: Path) -> Any:
    """An onnxruntime CPU session on the graph, with torch's intra-op thread count (one setting for both runtimes)."""
    import onnxruntime  # only CXR_RUNTIME=onnx and `cxr export` run graphs: its import is spared everywhere else

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1  # one forward pass at a time, as the model service runs them
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are not the user's business
    try:
        return onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # a truncated or foreign file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise BrokenModel(f"cannot load {onnx_path}: {first}") from None
