"""The one way to load and use a trained model: evaluation, serving, tuning and tests all use it.

A model directory holds ``model.safetensors`` (weights, no pickle) and ``model.json``, the typed
:class:`~cxr.models.card.ModelCard` (architecture, preprocessing, read limits, task, labels, threshold,
lineage). Loading never executes code from the model files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from cxr.data.loader import tabular_features
from cxr.errors import UserError
from cxr.fsutil import atomic_dir
from cxr.imaging import Image, read_image
from cxr.models.build import build_from_spec
from cxr.models.card import ModelCard
from cxr.models.ood import PREFIX as OOD_PREFIX
from cxr.models.ood import FeatureTap, OodDetector
from cxr.models.wrappers import combine_logits
from cxr.preprocess import preprocess
from cxr.task import Task

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"


class ModelLoadError(UserError):
    """No usable model at the given location."""


class BrokenModel(ModelLoadError):
    """The model is there but cannot be trusted: changed, unloadable, or answering NaN."""


class NonFiniteOutput(ValueError):
    """The network gave NaN or inf for a film: there is no probability to decide on."""


PRECISIONS = ("fp32", "bf16")
ABSTAIN = "abstain"  # the decision for a film out of distribution


@dataclass
class Scores:
    """What one forward pass says about a batch of films."""

    probs: np.ndarray  # (B,) binary, (B, K) otherwise
    ood: np.ndarray | None  # (B,) out-of-distribution scores; None: the model has no OOD check
    spread: np.ndarray | None  # (B,) standard deviation of the members' / views' probabilities; None: one network

    def of(self, i: int) -> dict[str, float | None]:
        """Film ``i``'s OOD score and spread, as :meth:`Predictor.describe` takes them."""
        return {
            "ood": None if self.ood is None else float(self.ood[i]),
            "spread": None if self.spread is None else float(self.spread[i]),
        }


class Predictor:
    """``precision="bf16"`` runs the forward pass under bfloat16 autocast: several times the images/s on
    a GPU or a CPU with AMX (Intel Xeon 4th gen+), probabilities within ~1e-2 of fp32's; slower on a CPU
    without native bf16. Grad-CAM (``cxr.serving.explain``) always runs in fp32. This one runs the network in
    torch; cxr.models.onnx_runtime.OnnxPredictor runs the same model's model.onnx in onnxruntime."""

    runtime = "torch"

    def __init__(
        self,
        model: torch.nn.Module,
        card: ModelCard,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        ood: OodDetector | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
        self.precision = precision
        self.device = torch.device(device)
        # channels_last like the inputs (and like training): oneDNN's fast convolutions need both; measured on
        # 2 Xeon cores, resnet18 224 px: 1.3x the images/s in fp32, 2.5x in bf16 at batch 8, than NCHW weights
        self.model = model.to(self.device).to(memory_format=torch.channels_last).eval()
        self.card = card
        self.spec = card.preprocess_spec
        self.task: Task = card.task
        self.labels: list[str] = list(card.labels)
        self.threshold = card.threshold
        self.uses_tabular = card.n_tabular > 0
        self.limits = card.limits
        self.ood = ood if card.ood is not None else None

    # --- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path, device: str | torch.device = "cpu", precision: str = "fp32") -> "Predictor":
        """The model in ``path``, checked: weights equal to the card's hash, loadable into its architecture, and
        finite probabilities on a probe pass. Anything else is one ModelLoadError line, never a traceback."""
        card, model, ood = load_checked(path)
        predictor = cls(model, card, device, precision, ood)
        predictor.probe()
        return predictor

    def probe(self) -> None:
        """One forward pass on two made-up films: a network with NaN or inf in its weights answers NaN for every
        film, and a NaN decision reads as "negative", so such a model is refused at load."""
        scores = self.score(probe_films(self.spec.size))
        if not _finite(scores.probs) or (scores.ood is not None and not _finite(scores.ood)):
            raise BrokenModel(
                "the model answers NaN or inf on a probe image: its weights are broken; retrain it or serve another version"
            )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_dir(path) as tmp:
            state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            if self.ood is not None:
                state.update({OOD_PREFIX + k: v.detach().cpu().contiguous() for k, v in self.ood.state_dict().items()})
            data = safetensors.torch.save(state)
            (tmp / WEIGHTS_FILE).write_bytes(data)
            # no model.onnx is written here: `cxr export` makes one for these weights and records its hash
            self.card = self.card.model_copy(
                update={"weights_sha256": hashlib.sha256(data).hexdigest(), "onnx_sha256": None}
            )
            (tmp / CARD_FILE).write_text(self.card.to_json())
        return path

    # --- inference ----------------------------------------------------------------------------

    def read(
        self, src: str | Path | bytes, name: str | None = None, header_check: Callable[[dict], None] | None = None
    ) -> Image:
        """The image, within the model's read limits; ``header_check`` may refuse it from its header, before any
        pixel is decoded."""
        return read_image(src, self.limits, name=name, header_check=header_check)

    def prepare_input(self, image: Image | np.ndarray) -> np.ndarray:
        """The model's own preprocessing: the same function prepare used for its training data."""
        return preprocess(image, self.spec)

    def predict_proba(self, images: np.ndarray, tabular: np.ndarray | None = None, batch_size: int = 256) -> np.ndarray:
        """Preprocessed uint8 images (B, H, W) -> probabilities: (B,) binary, (B, K) otherwise."""
        return self.score(images, tabular, batch_size).probs

    @torch.inference_mode()
    def score(self, images: np.ndarray, tabular: np.ndarray | None = None, batch_size: int = 256) -> Scores:
        """Preprocessed uint8 images (B, H, W) -> probabilities, out-of-distribution scores and member spread."""
        images = np.asarray(images)
        if images.ndim == 2:
            images = images[None]
        if self.uses_tabular and tabular is None:
            tabular = np.zeros((len(images), self.card.n_tabular), np.float32)
        probs, spreads, summaries = [], [], []
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(self.device)
            x = x.unsqueeze(1).float().div_(255.0).contiguous(memory_format=torch.channels_last)
            t = None if tabular is None else torch.from_numpy(np.asarray(tabular[start : start + len(x)], np.float32))
            logits, stats = self.run_network(x, None if t is None else t.to(self.device))
            p, spread = self._combine(logits)
            probs.append(p)
            spreads.append(spread)
            summaries.append(stats)
        ood = self.ood.score([np.concatenate(s) for s in zip(*summaries)]) if self.ood is not None and probs else None
        out = np.concatenate(probs) if probs else np.zeros((0, len(self.labels)), np.float32)
        spread = np.concatenate(spreads) if probs and spreads[0] is not None else None
        return Scores(self.task.squeeze(out), ood, spread)

    def run_network(self, x: torch.Tensor, t: torch.Tensor | None) -> tuple[torch.Tensor, list[np.ndarray]]:
        """One batch through the network: the members' / views' logits ``(S, B, K)`` (S = 1 for one network) and
        the OOD stages' summaries (FeatureTap's; [] without an OOD check)."""
        with FeatureTap(self.model, self.card.ood.stages if self.ood is not None else []) as tap:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                logits = stacked_logits(self.model, x, t).float()
            tap.end_batch()  # `stacked` is not a call of the model, whose hook would close the batch
        return logits, tap.take()

    def _combine(self, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """The probabilities of the (weighted) mean logits, and the spread of the members' / views' (None: one
        network)."""
        probs = self.activate(combine_logits(self.model, logits)).cpu().numpy()
        if not hasattr(self.model, "stacked"):
            return probs, None
        per_member = torch.stack([self.activate(member) for member in logits])  # (members, B, K)
        return probs, per_member.std(dim=0).mean(dim=1).cpu().numpy()

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        return self.task.activate(logits)

    def predict_images(self, images: Sequence[Image]) -> list[dict[str, Any]]:
        """Decoded images -> one result per image (probabilities per label, decision, threshold)."""
        arrays = np.stack([self.prepare_input(im) for im in images]) if images else np.zeros((0, 1, 1), np.uint8)
        scores = self.score(arrays, self.tabular_for(images))
        return [self.describe(p, **scores.of(i)) for i, p in enumerate(scores.probs)]

    def tabular_for(self, images: Sequence[Image]) -> np.ndarray | None:
        """The tabular inputs (age, sex, view from the image headers) of a fusion model; None otherwise."""
        if not self.uses_tabular:
            return None
        import pandas as pd

        return tabular_features(pd.DataFrame([{k: im.meta.get(k) for k in ("age", "sex", "view")} for im in images]))

    def predict_files(self, sources: Sequence[str | Path | bytes]) -> list[dict[str, Any]]:
        return self.predict_images([self.read(s) for s in sources])

    def describe(
        self,
        prob: np.ndarray | float,
        threshold: float | None = None,
        *,
        ood: float | None = None,
        spread: float | None = None,
        decide_out_of_distribution: bool = False,
    ) -> dict[str, Any]:
        """Probabilities per label plus the decision at the model's own threshold(s), or (binary) at ``threshold``
        when given (a site's operating point). A film out of distribution gets the decision ``abstain`` and the
        reason, unless ``decide_out_of_distribution`` asks for the decision anyway."""
        if not _finite(prob) or (ood is not None and not _finite(ood)):
            raise NonFiniteOutput(
                "the model gave no valid probability for this film (NaN or inf), so it gives no decision"
            )
        out = self._decision(prob, threshold)
        if self.card.ood is None:  # the card, not the detector: a weightless copy (the HTTP process) words answers
            out["ood"] = {"checked": False}
        elif ood is None:
            raise ValueError("this model checks every film: describe() needs its ood score (Predictor.score)")
        else:
            limit = self.card.ood.threshold
            inside = bool(ood <= limit)
            out["ood"] = {"checked": True, "score": ood, "threshold": limit, "in_distribution": inside}
            if not inside and not decide_out_of_distribution:
                out.update(prediction=ABSTAIN, abstain_reason=self.abstain_reason(ood))
                if "positive" in out:
                    out["positive"] = None
        if spread is not None:
            out["uncertainty"] = float(spread)  # spread of the members' / views' probabilities
        return out

    def abstain_reason(self, score: float) -> str:
        check = self.card.ood
        return (
            f"out of distribution: unlike the films the model was trained on (score {score:.1f} above {check.threshold:.1f}, "
            f"which {check.val_pass_rate:.0%} of validation films stay under), so it gives no decision"
        )

    def _decision(self, prob: np.ndarray | float, threshold: float | None) -> dict[str, Any]:
        if self.task.binary:
            p, t = float(prob), self.threshold if threshold is None else threshold
            return {
                "probabilities": {self.labels[0]: 1 - p, self.labels[1]: p},
                "prediction": self.labels[1] if p >= t else self.labels[0],
                "positive": bool(p >= t),
                "threshold": t,
            }
        probs = {label: float(v) for label, v in zip(self.labels, np.asarray(prob))}
        if self.task.exclusive:
            return {"probabilities": probs, "prediction": max(probs, key=probs.get), "threshold": None}
        return {
            "probabilities": probs,
            "prediction": [lab for lab, t in zip(self.labels, self.threshold) if probs[lab] >= t],
            "threshold": dict(zip(self.labels, self.threshold)),
        }


def probe_films(side: int) -> np.ndarray:
    """Two made-up films, flat grey and a diagonal ramp, uint8 ``(2, side, side)``: no patient data."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    return np.stack([np.full((side, side), 128), np.outer(ramp, ramp[::-1]) / 255]).astype(np.uint8)


def stacked_logits(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    """The members' / views' logits ``(S, B, K)`` of an ensemble or TTA model (``stacked``), else ``(1, B, K)``."""
    stacked = getattr(model, "stacked", None)
    return stacked(x, t) if stacked else model(x, t)[None]


def _finite(values: Any) -> bool:
    return bool(np.all(np.isfinite(np.asarray(values, dtype=np.float64))))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def check_weights_digest(card: ModelCard, weights_path: Path, data: bytes) -> None:
    """The weights (``data``, read from ``weights_path``) must be the ones the card was written with (a card from
    before hashes is trusted as it is)."""
    if card.weights_sha256 is None:
        return
    found = hashlib.sha256(data).hexdigest()
    if found != card.weights_sha256:
        raise BrokenModel(
            f"{weights_path} is not the file this model was saved with (sha256 {found[:12]}…, its card says "
            f"{card.weights_sha256[:12]}…): the weights were changed or corrupted; restore or re-register the model"
        )


def read_card(path: str | Path) -> ModelCard:
    """The card of the model directory ``path`` (weights not read)."""
    card_path = Path(path) / CARD_FILE
    return ModelCard.from_json(card_path.read_text(), str(card_path))


def load_checked(path: str | Path) -> tuple[ModelCard, torch.nn.Module, OodDetector | None]:
    """The card, network and OOD detector in ``path``, the weights checked against the card's hash; anything
    wrong is one ModelLoadError line."""
    path = Path(path)
    card_path, weights_path = path / CARD_FILE, path / WEIGHTS_FILE
    if not card_path.exists() or not weights_path.exists():
        raise ModelLoadError(
            f"no cxr model at {path} (expected {CARD_FILE} and {WEIGHTS_FILE}); train one with `cxr train`"
        )
    card = read_card(path)
    data = weights_path.read_bytes()  # read once: hashed, then loaded
    check_weights_digest(card, weights_path, data)
    try:
        model, ood = _load_weights(card, data)
    except Exception as exc:  # truncated or foreign safetensors, another architecture's tensors
        raise BrokenModel(f"cannot load the weights {weights_path}: {_first_line(exc)}") from None
    return card, model, ood


def _load_weights(card: ModelCard, data: bytes) -> tuple[torch.nn.Module, OodDetector | None]:
    model = build_from_spec(card.architecture)
    state = safetensors.torch.load(data)  # safetensors: tensors only, nothing executed
    ood_state = {k[len(OOD_PREFIX) :]: state.pop(k) for k in [k for k in state if k.startswith(OOD_PREFIX)]}
    model.load_state_dict(state)
    if card.ood is None:
        return model, None
    ood = OodDetector(card.ood.dims, card.ood.classes)
    ood.load_state_dict(ood_state)
    return model, ood
