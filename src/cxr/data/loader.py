"""Batches from the prepared arrays: targets, tabular features and (train-only) tensor augmentation.

The prepared uint8 array stays memory-mapped and is read batch by batch (sorted indices, so reads stay
mostly sequential): memory does not grow with the dataset, and the OS page cache keeps a set that fits
in RAM as fast as an in-memory copy after the first epoch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxr.data.prepare import array_path, load_card
from cxr.errors import UserError
from cxr.task import Task

VIEWS = ("PA", "AP")
SEXES = ("M", "F")


def tabular_features(manifest: pd.DataFrame) -> np.ndarray:
    """Age (years/100, 0 with a missing flag), sex and view one-hot with 'unknown' columns: (N, 8) float32."""
    age = pd.to_numeric(manifest.get("age"), errors="coerce").to_numpy(dtype=np.float64)
    missing = np.isnan(age)
    cols = [np.where(missing, 0.0, np.clip(age, 0, 110) / 100.0), missing.astype(float)]
    sex = manifest.get("sex", pd.Series([None] * len(manifest))).fillna("").astype(str).str.upper()
    cols += [(sex == s).to_numpy(float) for s in SEXES] + [(~sex.isin(SEXES)).to_numpy(float)]
    view = manifest.get("view", pd.Series([None] * len(manifest))).fillna("").astype(str).str.upper()
    cols += [(view == v).to_numpy(float) for v in VIEWS] + [(~view.isin(VIEWS)).to_numpy(float)]
    return np.stack(cols, axis=1).astype(np.float32)


N_TABULAR = 8


@dataclass(frozen=True)
class Shard:
    """This process's part of every batch under data-parallel training: rank ``rank`` of ``world`` processes."""

    rank: int
    world: int

    def positions(self, n: int) -> np.ndarray:
        """Where this rank's rows sit in a global batch of ``n``: every ``world``-th one, the batch first padded
        by repeating its own rows to a multiple of ``world`` so that every rank takes as many (as
        DistributedSampler pads)."""
        padded = -(-n // self.world) * self.world
        return np.resize(np.arange(n), padded)[self.rank :: self.world]


def encode_targets(labels: pd.Series, task: Task | str, classes: list[str]) -> np.ndarray:
    """binary: (N,) float 0/1 for classes[1]; multiclass: (N,) int64; multilabel: (N, K) float."""
    labels = labels.fillna("").astype(str)
    task = Task(task)
    if task.multilabel:
        sets = labels.str.split("|")
        return np.stack([sets.apply(lambda f, c=c: c in f).to_numpy(np.float32) for c in classes], axis=1)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise UserError(f"labels {unknown[:5]} are not among the classes {classes}")
    codes = labels.map(index).to_numpy(np.int64)
    return codes.astype(np.float32) if task.binary else codes


@dataclass
class PreparedData:
    """The prepared dataset at one size: images (read-only memmap, never copied whole), manifest, targets, tabular."""

    root: Path
    size: int

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.card = load_card(self.root)
        if self.size not in self.card["sizes"]:
            raise UserError(
                f"no prepared arrays at {self.size} px in {self.root} (prepared sizes: {self.card['sizes']}); "
                f"add it to prepare.sizes and run `cxr prepare`"
            )
        self.manifest = pd.read_csv(
            self.root / "manifest.csv", dtype={"label": str}, keep_default_na=False, na_values={"age": [""]}
        )
        self.images = np.load(array_path(self.root, self.size), mmap_mode="r")
        if len(self.images) != len(self.manifest):
            raise UserError(f"{self.root} is inconsistent: {len(self.images)} images, {len(self.manifest)} rows")
        self.task = Task(self.card["task"])
        self.classes: list[str] = list(self.card["classes"])
        self.targets = encode_targets(self.manifest["label"], self.task, self.classes)
        self.tabular = tabular_features(self.manifest)

    @property
    def n_outputs(self) -> int:
        return self.task.n_outputs(len(self.classes))

    def split(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.manifest["split"].to_numpy() == name)

    def split_hash(self, name: str) -> str:
        """A split's content: its images' pixel hashes and labels (not file names or order) and how they were
        prepared at this size; the same films and labels prepared the same way hash the same."""
        rows = self.manifest.iloc[self.split(name)]
        recipe = json.dumps({"size": self.size, "preprocess": self.card.get("preprocess")}, sort_keys=True)
        lines = sorted(f"{h}\t{label}" for h, label in zip(rows["pixel_hash"], rows["label"]))
        return hashlib.sha256("\n".join([recipe, *lines]).encode()).hexdigest()

    def batches(
        self,
        index: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        sample_weights: np.ndarray | None = None,
        device: torch.device | str = "cpu",
        shard: Shard | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]]:
        """Yield (images float [0,1] (B,1,H,W), targets, tabular, row indices) on ``device``.

        With ``shard``, ``batch_size`` is the global batch: every rank draws the same order (the generator is
        seeded alike) and reads only its :meth:`Shard.positions` of each batch."""
        device = torch.device(device)
        if sample_weights is not None:  # balanced sampling: draw with replacement by weight
            w = torch.as_tensor(sample_weights[index], dtype=torch.double)
            order = index[torch.multinomial(w, len(index), replacement=True, generator=generator).numpy()]
        elif shuffle:
            order = index[torch.randperm(len(index), generator=generator).numpy()]
        else:
            order = index
        pin = device.type == "cuda"
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            if shard is not None:
                rows = rows[shard.positions(len(rows))]
            x = torch.from_numpy(np.ascontiguousarray(self.images[np.sort(rows)]))
            x = x[torch.from_numpy(np.argsort(np.argsort(rows)))]  # undo the sort so rows match targets
            y = torch.from_numpy(self.targets[rows])
            t = torch.from_numpy(self.tabular[rows])
            if pin:
                x, y, t = x.pin_memory(), y.pin_memory(), t.pin_memory()
            x = x.to(device, non_blocking=True).unsqueeze(1).float().div_(255.0)
            yield x, y.to(device, non_blocking=True), t.to(device, non_blocking=True), rows
