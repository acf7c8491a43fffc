"""Who answers an external evaluation: the served model's task, labels, threshold and identity."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr.errors import UserError
from cxr.serving.served import ServedModel
from cxr.task import Task

if TYPE_CHECKING:
    from cxr.config import Config
    from cxr.serving.served import ServedModel as Served


IN_PROCESS = "in-process"


@dataclass
class EvaluatedModel:
    """What scoring needs (task, labels, threshold) and who the model is, from the service's /metadata
    (in-process: the same metadata, from cxr.serving.served without HTTP)."""

    task: Task
    labels: list[str]
    threshold: Any
    name: str | None = None
    version: str | None = None
    uri: str | None = None
    run_id: str | None = None
    dataset_hash: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def identity(self) -> str:
        """What cached answers are keyed on: the registry version, else the training run, else the info."""
        if self.version:
            return f"{self.name}/{self.version}"
        if self.run_id:
            return f"run:{self.run_id}"
        return "info:" + hashlib.sha256(json.dumps(self.info, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def stamp(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "uri": self.uri}

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "EvaluatedModel":
        model, training = meta.get("model") or {}, meta.get("training") or {}
        if not meta.get("labels") or not meta.get("task"):
            raise UserError(
                f"the service's /metadata names no task and labels (keys: {sorted(meta)}); is this a cxr service?"
            )
        version = model.get("version")
        return cls(
            task=Task(meta["task"]),
            labels=list(meta["labels"]),
            threshold=meta.get("threshold"),
            name=model.get("name"),
            version=None if version is None else str(version),
            uri=model.get("uri"),
            run_id=training.get("run_id"),
            dataset_hash=training.get("dataset_hash"),
            info=meta,
        )


def load_in_process(uri: str | Path, cfg: "Config | None" = None) -> "Served":
    """The service's own model object, without HTTP: loaded exactly as `bentoml serve` loads it
    (``models:/NAME@ALIAS`` resolved to its version once, so the version reported is the one that answered)."""

    return ServedModel.load(cfg, uri)
