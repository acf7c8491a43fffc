"""The one way to load and use a trained model: evaluation, serving, tuning and tests all use it.

A model directory holds ``model.safetensors`` (weights, no pickle) and ``model.json``, the typed
:class:`~cxr.models.card.ModelCard` (architecture, preprocessing, read limits, task, labels, threshold,
lineage). Loading never executes code from the model files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cxr.data.loader import tabular_features
from cxr.errors import UserError
from cxr.fsutil import atomic_dir
from cxr.imaging import Image, read_image
from cxr.models.build import build_from_spec
from cxr.models.card import ModelCard
from cxr.preprocess import preprocess

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"


class ModelLoadError(UserError):
    """No usable model at the given location."""


PRECISIONS = ("fp32", "bf16")


class Predictor:
    """``precision="bf16"`` runs the forward pass under bfloat16 autocast: several times the images/s on
    a GPU or a CPU with AMX (Intel Xeon 4th gen+), probabilities within ~1e-2 of fp32's; slower on a CPU
    without native bf16. Grad-CAM (``cxr.serving.explain``) always runs in fp32."""

    def __init__(
        self, model: torch.nn.Module, card: ModelCard, device: str | torch.device = "cpu", precision: str = "fp32"
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
        self.task: str = card.task
        self.labels: list[str] = list(card.labels)
        self.threshold = card.threshold
        self.uses_tabular = card.n_tabular > 0
        self.limits = card.limits

    # --- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path, device: str | torch.device = "cpu", precision: str = "fp32") -> "Predictor":
        path = Path(path)
        card_path, weights_path = path / CARD_FILE, path / WEIGHTS_FILE
        if not card_path.exists() or not weights_path.exists():
            raise ModelLoadError(
                f"no cxr model at {path} (expected {CARD_FILE} and {WEIGHTS_FILE}); train one with `cxr train`"
            )
        card = ModelCard.from_json(card_path.read_text(), str(card_path))
        model = build_from_spec(card.architecture)
        state = load_file(str(weights_path))  # safetensors: tensors only, nothing executed
        model.load_state_dict(state)
        return cls(model, card, device, precision)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_dir(path) as tmp:
            state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE))
            (tmp / CARD_FILE).write_text(self.card.to_json())
        return path

    # --- inference ----------------------------------------------------------------------------

    def read(self, src: str | Path | bytes, name: str | None = None) -> Image:
        return read_image(src, self.limits, name=name)

    def prepare_input(self, image: Image | np.ndarray) -> np.ndarray:
        """The model's own preprocessing: the same function prepare used for its training data."""
        return preprocess(image, self.spec)

    @torch.inference_mode()
    def predict_proba(self, images: np.ndarray, tabular: np.ndarray | None = None, batch_size: int = 256) -> np.ndarray:
        """Preprocessed uint8 images (B, H, W) -> probabilities: (B,) binary, (B, K) otherwise."""
        images = np.asarray(images)
        if images.ndim == 2:
            images = images[None]
        outs = []
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(self.device)
            x = x.unsqueeze(1).float().div_(255.0).contiguous(memory_format=torch.channels_last)
            t = None
            if self.uses_tabular:
                if tabular is None:
                    tabular = np.zeros((len(images), self.card.n_tabular), np.float32)
                t = torch.from_numpy(np.asarray(tabular[start : start + batch_size], np.float32)).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                logits = self.model(x, t).float()
            outs.append(self.activate(logits).cpu().numpy())
        probs = np.concatenate(outs) if outs else np.zeros((0, len(self.labels)), np.float32)
        return probs[:, 0] if self.task == "binary" else probs

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=1) if self.task == "multiclass" else torch.sigmoid(logits)

    def predict_images(self, images: Sequence[Image]) -> list[dict[str, Any]]:
        """Decoded images -> one result per image (probabilities per label, decision, threshold)."""
        arrays = np.stack([self.prepare_input(im) for im in images]) if images else np.zeros((0, 1, 1), np.uint8)
        probs = self.predict_proba(arrays, self.tabular_for(images))
        return [self.describe(p) for p in probs]

    def tabular_for(self, images: Sequence[Image]) -> np.ndarray | None:
        """The tabular inputs (age, sex, view from the image headers) of a fusion model; None otherwise."""
        if not self.uses_tabular:
            return None
        import pandas as pd

        return tabular_features(pd.DataFrame([{k: im.meta.get(k) for k in ("age", "sex", "view")} for im in images]))

    def predict_files(self, sources: Sequence[str | Path | bytes]) -> list[dict[str, Any]]:
        return self.predict_images([self.read(s) for s in sources])

    def describe(self, prob: np.ndarray | float, threshold: float | None = None) -> dict[str, Any]:
        """Probabilities per label plus the decision at the model's own threshold(s), or (binary) at
        ``threshold`` when given (a site's operating point)."""
        if self.task == "binary":
            p, t = float(prob), self.threshold if threshold is None else threshold
            return {
                "probabilities": {self.labels[0]: 1 - p, self.labels[1]: p},
                "prediction": self.labels[1] if p >= t else self.labels[0],
                "positive": bool(p >= t),
                "threshold": t,
            }
        probs = {label: float(v) for label, v in zip(self.labels, np.asarray(prob))}
        if self.task == "multiclass":
            return {"probabilities": probs, "prediction": max(probs, key=probs.get), "threshold": None}
        return {
            "probabilities": probs,
            "prediction": [lab for lab, t in zip(self.labels, self.threshold) if probs[lab] >= t],
            "threshold": dict(zip(self.labels, self.threshold)),
        }
