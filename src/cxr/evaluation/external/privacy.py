"""File names stay local: salted hashes for what leaves the machine."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    pass


LOCAL_NAMES_NOTE = "file names appear in this local report only; MLflow holds salted hashes"


MLFLOW_NAMES_NOTE = (
    "file names are salted hashes here (HMAC-SHA256, a random salt per report, kept nowhere): the names are in the "
    "local report only, whose predictions.csv has the same file_id column"
)


@dataclass(frozen=True)
class FileIds:
    """A salted hash of each file name, for what leaves this machine (MLflow).

    The salt is random per report and never written: nobody, not even whoever holds the MLflow store, can test a
    candidate name (a patient's) against a hash. A per-store secret would make the ids stable across reports, but
    that secret would have to be kept and guarded somewhere, and the ids would link one file across runs; the
    content's sha256 already says when two rows are the same image. The local report's predictions.csv carries
    the same id beside each name, so its owner can match MLflow's rows to files."""

    salt: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    def __call__(self, name: str) -> str:
        return hmac.new(self.salt, name.encode(), hashlib.sha256).hexdigest()[:20]


def without_file_names(
    report: dict[str, Any], predictions: pd.DataFrame, ids: FileIds
) -> tuple[dict[str, Any], pd.DataFrame]:
    """The report and predictions for MLflow: each file name replaced by its id, and the notes saying so."""
    shared = json.loads(json.dumps(report, default=str))  # a deep copy, as external.json holds it
    for failure in shared["failures"]:
        failure["file"] = ids(failure["file"])
    notes = shared["data"]["notes"]
    shared["data"]["notes"] = [MLFLOW_NAMES_NOTE if n == LOCAL_NAMES_NOTE else n for n in notes]
    return shared, predictions.drop(columns="file")
