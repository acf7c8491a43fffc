"""The question a model answers about a film, and what that means for its outputs, activation, labels and decision.

``Task("binary")`` is ``Task.BINARY``, and a Task equals its name as a string, so cards and JSON files keep their
schema. Code asks the Task (``task.binary``, ``task.activate(logits)``), never compares task names.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import numpy as np
from scipy.special import expit
from scipy.special import softmax as softmax_array


class Task(StrEnum):
    BINARY = "binary"  # one finding, present or not: one sigmoid output, a threshold
    MULTICLASS = "multiclass"  # exactly one class per film: a softmax over the classes, the arg-max decides
    MULTILABEL = "multilabel"  # any number of findings per film: a sigmoid and a threshold each

    @property
    def binary(self) -> bool:
        return self is Task.BINARY

    @property
    def exclusive(self) -> bool:
        """The classes exclude each other (one per film): softmax, arg-max, no threshold."""
        return self is Task.MULTICLASS

    @property
    def multilabel(self) -> bool:
        return self is Task.MULTILABEL

    def n_outputs(self, n_classes: int) -> int:
        """Logits of a network for ``n_classes`` labels: one for binary (the positive class's)."""
        return 1 if self.binary else n_classes

    def activate(self, logits: Any) -> Any:
        """Probabilities from a torch tensor of logits ``(B, K)``."""
        return logits.softmax(dim=1) if self.exclusive else logits.sigmoid()

    def activate_array(self, logits: np.ndarray) -> np.ndarray:
        """Probabilities from a numpy array of logits ``(B, K)``."""
        return softmax_array(logits, axis=1) if self.exclusive else expit(logits)

    def squeeze(self, probs: Any) -> Any:
        """A binary model's ``(B, 1)`` as ``(B,)``, the positive class's probability; others as they are."""
        return probs[:, 0] if self.binary else probs

    def indicators(self, y: np.ndarray, n_classes: int) -> np.ndarray:
        """Targets as ``(N, K)`` 0/1 per class (multiclass: one-hot of the class index), for per-class AUROC."""
        return np.eye(n_classes)[y] if self.exclusive else np.asarray(y).reshape(len(y), -1)
