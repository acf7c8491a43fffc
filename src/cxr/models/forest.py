"""The random-forest baseline's network: scikit-learn's trees as tensors, evaluated for a whole batch at once.

``cxr.training.baseline`` fits a RandomForestClassifier on the linear baseline's pooled pixels and copies its trees
here (:meth:`ForestBaseline.from_sklearn`): per node a feature index, a threshold, two children and the leaf's class
probabilities, all trees in one flat table. So the forest is saved as safetensors, rebuilt from its JSON spec and
served by the one Predictor like every network: no pickle. It has no out-of-distribution check: there are no feature
maps whose statistics ``cxr.models.ood`` could summarise (``ood_stages`` is empty, the card's ``ood`` is None).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from cxr.models.linear import POOL, pooled_pixels

ARCH = "random_forest"
LOGIT_LIMIT = 30.0  # a unanimous forest says 0 or 1: clamp its logit so it stays finite (sigmoid(30) = 1 - 1e-13)
_LEAF = -1  # sklearn's children_left of a leaf


class ForestBaseline(nn.Module):
    """Average-pool to POOL x POOL, flatten, walk every tree ``depth`` steps, average the leaves' probabilities.

    ``softmax``: the leaves hold class probabilities (multiclass) and the logits are their logs; otherwise each
    output's positive-class probability (binary, multilabel) and the logits are its log-odds. So the Predictor's
    activation gives back scikit-learn's ``predict_proba``.
    """

    n_tabular = 0

    def __init__(self, n_outputs: int, n_nodes: int, n_trees: int, depth: int, softmax: bool, pool: int = POOL) -> None:
        super().__init__()
        self.n_outputs, self.depth, self.softmax, self.pool = int(n_outputs), int(depth), bool(softmax), int(pool)
        # a leaf is its own two children, so walking past it stays on it
        self.register_buffer("feature", torch.zeros(n_nodes, dtype=torch.long))
        self.register_buffer("threshold", torch.zeros(n_nodes))
        self.register_buffer("left", torch.zeros(n_nodes, dtype=torch.long))
        self.register_buffer("right", torch.zeros(n_nodes, dtype=torch.long))
        self.register_buffer("value", torch.zeros(n_nodes, self.n_outputs))
        self.register_buffer("roots", torch.zeros(n_trees, dtype=torch.long))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_pixels(x, self.pool)

    def leaves(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, F) features -> (B, trees) index of the leaf each film reaches in each tree."""
        node = self.roots.expand(feats.shape[0], -1)  # shape[0], not len(): a traced graph keeps the batch dynamic
        for _ in range(self.depth):
            goes_left = feats.gather(1, self.feature[node]) <= self.threshold[node]
            node = torch.where(goes_left, self.left[node], self.right[node])
        return node

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_outputs) float64: scikit-learn's predict_proba (positive class per output unless ``softmax``)."""
        return self.value[self.leaves(self.features(x.float()))].double().mean(dim=1)

    def forward(self, x: torch.Tensor, tabular: torch.Tensor | None = None) -> torch.Tensor:
        p = self.probabilities(x)
        logits = p.log() if self.softmax else torch.logit(p)
        return logits.clamp(-LOGIT_LIMIT, LOGIT_LIMIT).float()

    @property
    def spec(self) -> dict[str, Any]:
        return {
            "arch": ARCH,
            "n_outputs": self.n_outputs,
            "n_nodes": len(self.feature),
            "n_trees": len(self.roots),
            "depth": self.depth,
            "softmax": self.softmax,
            "pool": self.pool,
            "n_tabular": 0,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "ForestBaseline":
        keys = ("n_outputs", "n_nodes", "n_trees", "depth", "softmax")
        return cls(*(spec[k] for k in keys), pool=int(spec.get("pool", POOL)))

    @classmethod
    def from_sklearn(cls, forest: Any, n_outputs: int, softmax: bool, pool: int = POOL) -> "ForestBaseline":
        """The torch twin of a fitted ``RandomForestClassifier`` (single- or multi-output)."""
        trees = [est.tree_ for est in forest.estimators_]
        classes = list(forest.classes_) if forest.n_outputs_ > 1 else [forest.classes_]
        offsets = np.cumsum([0] + [t.node_count for t in trees])
        model = cls(n_outputs, int(offsets[-1]), len(trees), max(t.max_depth for t in trees), softmax, pool)
        tables = [_tree_table(t, int(o), classes, n_outputs, softmax) for t, o in zip(trees, offsets)]
        with torch.no_grad():
            for name in ("feature", "threshold", "left", "right", "value"):
                column = np.concatenate([table[name] for table in tables])
                getattr(model, name).copy_(torch.from_numpy(column))
            model.roots.copy_(torch.from_numpy(offsets[:-1]))
        return model


def _tree_table(tree: Any, offset: int, classes: list, n_outputs: int, softmax: bool) -> dict[str, np.ndarray]:
    """One tree's nodes with indices shifted by ``offset`` into the forest's flat table."""
    own = np.arange(tree.node_count)
    leaf = tree.children_left == _LEAF
    return {
        "feature": np.where(leaf, 0, tree.feature).astype(np.int64),
        "threshold": np.where(leaf, 0.0, _floor_float32(tree.threshold)).astype(np.float32),
        "left": (np.where(leaf, own, tree.children_left) + offset).astype(np.int64),
        "right": (np.where(leaf, own, tree.children_right) + offset).astype(np.int64),
        "value": _leaf_probabilities(tree.value, classes, n_outputs, softmax).astype(np.float32),
    }


def _floor_float32(threshold: np.ndarray) -> np.ndarray:
    """The largest float32 at or under each float64 threshold: for float32 features (what scikit-learn's trees
    compare too) ``x <= t`` and ``x <= floor32(t)`` agree, where rounding to nearest could flip a tie."""
    rounded = threshold.astype(np.float32)
    return np.where(rounded > threshold, np.nextafter(rounded, np.float32(-np.inf)), rounded)


def _leaf_probabilities(value: np.ndarray, classes: list, n_outputs: int, softmax: bool) -> np.ndarray:
    """(nodes, n_outputs) as predict_proba reads a leaf: each output's class weights normalised to one."""
    total = value.sum(axis=2, keepdims=True)
    frac = value / np.where(total == 0, 1.0, total)
    out = np.zeros((len(value), n_outputs))
    if softmax:  # one output: a column per class the training split held
        for j, c in enumerate(classes[0]):
            out[:, int(c)] = frac[:, 0, j]
        return out
    for k, output_classes in enumerate(classes):  # each output's positive class, absent: probability 0
        positive = np.flatnonzero(np.asarray(output_classes) == 1)
        if positive.size:
            out[:, k] = frac[:, k, positive[0]]
    return out
