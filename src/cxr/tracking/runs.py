"""MLflow: where runs go, lineage tags, and logging a cxr model as an MLflow model.

Embedded by default (``sqlite:///mlflow.db`` plus a local artifact folder); ``MLFLOW_TRACKING_URI``
points everything at a server instead. Nothing here runs at import time.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from cxr.data.loader import PreparedData
from cxr.models.predictor import Predictor

if TYPE_CHECKING:
    from cxr.config import Config

log = logging.getLogger(__name__)
PYFUNC_CODE = Path(__file__).with_name("pyfunc.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the cxr package, shipped with every logged model
MODEL_CARD_ARTIFACT = "model_info.json"  # the logged model's card, next to the model in the run
EVALUATION_ARTIFACT = "evaluation/evaluation.json"  # what `cxr evaluate` logs to the model's training run
# The prepared splits a training run logs as datasets, with MLflow's context for each.
DATASET_CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}
DATASET_COLUMNS = ("pixel_hash", "label", "view", "sex", "age")
DIGEST_CHARS = 32  # MLflow stores at most 36 characters of a dataset digest


URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def configured_uri(cfg: "Config") -> str:
    """The tracking URI as the user gave it: MLFLOW_TRACKING_URI, else mlflow.tracking_uri."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri


def tracking_uri(cfg: "Config") -> str:
    """The configured URI, a relative sqlite path made absolute against the working directory."""
    uri = configured_uri(cfg)
    # mlflow caches one store per URI string: a relative sqlite path would stay bound to the first folder used
    relative = uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and ":memory:" not in uri
    return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}" if relative else uri


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def use_store(uri: str) -> None:
    """Point this process's mlflow at ``uri`` (tracking, and registry for an embedded store)."""
    import mlflow

    user_env = {k: os.environ.get(k) for k in URI_ENV}
    mlflow.set_tracking_uri(uri)
    # an embedded store holds its own registry (mlflow >= 3 would look elsewhere); a server owns its registry
    mlflow.set_registry_uri(None if _is_server(uri) else uri)
    # mlflow also exports both URIs to the environment; undo that, or a later configure() in this
    # process (another project, a test) and every child process would take them for the user's choice
    for key, value in user_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def configure(cfg: "Config") -> str:
    """Point mlflow at the configured store and experiment; returns the experiment id.

    A database URI (sqlite, postgresql, mysql) is an embedded store: the registry lives in the same
    database and artifacts go to the local ``mlflow.artifact_location`` folder. An http(s) URI is a
    tracking server that owns both.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri(cfg)
    use_store(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is None:
        location = cfg.mlflow.artifact_location or None
        if location and "://" not in location and not _is_server(uri):
            location = Path(location).resolve().as_uri()
        try:
            exp_id = client.create_experiment(cfg.mlflow.experiment, artifact_location=location)
        except MlflowException:  # another worker created it first
            exp_id = client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def logged_evaluation(run_id: str) -> dict[str, Any] | None:
    """The report `cxr evaluate` logged to the run, None if it never ran; ValueError if the file is not JSON."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/{EVALUATION_ARTIFACT}")
    except (MlflowException, OSError):
        return None
    return json.loads(text)


def git_state() -> dict[str, str]:
    """Commit and dirty flag of the working tree (``unknown`` outside git)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def lineage_tags(card: dict[str, Any]) -> dict[str, str]:
    return {
        **git_state(),
        "dataset_hash": card["dataset_hash"],
        "data_source": card["source"],
        "synthetic_data": str(bool(card.get("synthetic"))).lower(),
        "task": card["task"],
    }


@contextmanager
def run(
    cfg: "Config",
    *,
    name: str | None = None,
    nested: bool = False,
    tags: dict[str, str] | None = None,
    run_id: str | None = None,
) -> Iterator[Any]:
    """An MLflow run (a new one, or ``run_id`` continued), or ``None`` when tracking is disabled."""
    if not cfg.mlflow.enabled:
        yield None
        return
    import mlflow

    configure(cfg)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else name, nested=nested, tags=tags) as active:
        yield active


def log_training_inputs(cfg: "Config", data: PreparedData) -> None:
    """The training run's parameters (every config key), its config as YAML, the prepared data's card, and its
    splits as MLflow datasets (the run's lineage in the UI)."""
    import mlflow

    mlflow.log_params(cfg.flat())
    mlflow.log_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config/params.yaml")
    log_dict_artifact(data.card, "data/card.json")
    splits = [s for s in DATASET_CONTEXTS if len(data.split(s))]
    mlflow.log_inputs(
        datasets=[split_dataset(data, s) for s in splits],
        contexts=[DATASET_CONTEXTS[s] for s in splits],
        tags_list=[None] * len(splits),
    )


def split_dataset(data: PreparedData, split: str) -> Any:
    """One prepared split as an MLflow dataset: its content hash as digest, hashes and labels as the table
    (never paths or patient keys), the prepared manifest as source."""
    import mlflow

    rows = data.manifest.iloc[data.split(split)]
    table = rows[[c for c in DATASET_COLUMNS if c in rows]].reset_index(drop=True)
    with warnings.catch_warnings():  # mlflow registers the local source twice ("" and file://) and says so
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple")
        return mlflow.data.from_pandas(
            table,
            source=str((data.root / "manifest.csv").resolve()),
            targets="label",
            name=f"{data.card['source']} {split}",
            digest=data.split_hash(split)[:DIGEST_CHARS],
        )


def log_dict_artifact(data: dict[str, Any], name: str) -> None:
    import mlflow

    mlflow.log_text(json.dumps(data, indent=2, default=str), name)


def log_cxr_model(model_dir: Path, example: np.ndarray, name: str = "model") -> str:
    """Log a cxr model directory as an MLflow pyfunc model (models-from-code: nothing is pickled).

    The pyfunc takes preprocessed uint8 images (B, H, W) and returns probabilities; the cxr files
    travel as an artifact so ``cxr.tracking.uris.load_predictor`` rebuilds the model from safetensors + JSON;
    the model card is also logged on its own (``model_info.json``), for `cxr register` to read.
    """
    import mlflow
    from mlflow.models import infer_signature

    predictor = Predictor.from_dir(model_dir)
    output = predictor.predict_proba(example)
    signature = infer_signature(example, output)
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(PYFUNC_CODE),
        artifacts={"cxr_model": str(model_dir)},
        code_paths=[str(PACKAGE_DIR)],
        signature=signature,
        input_example=example,
        pip_requirements=pip_requirements(),
    )
    mlflow.set_tag("model_uri", info.model_uri)  # what `cxr register` registers
    log_dict_artifact(predictor.card.to_dict(), MODEL_CARD_ARTIFACT)
    return info.model_uri


def pip_requirements() -> list[str]:
    """Pinned from the running environment: resolving them is what makes log_model slow otherwise."""
    from importlib.metadata import version

    pkgs = [
        "torch",
        "torchvision",
        "numpy",
        "safetensors",
        "pydicom",
        "pillow",
        "pandas",
        "pyyaml",
        "pydantic",
        "mlflow",
        "pylibjpeg",
        "pylibjpeg-libjpeg",
        "pylibjpeg-openjpeg",
    ]
    out = []
    for p in pkgs:
        try:
            out.append(f"{p}=={version(p)}")
        except Exception:  # optional decoders may be absent
            continue
    return out


def example_batch(size: int) -> np.ndarray:
    """A non-patient input example: two synthetic gradients (batch of 2: mlflow bakes the batch size in)."""
    ramp = np.linspace(0, 255, size * size, dtype=np.float32).reshape(size, size)
    return np.stack([ramp, ramp.T]).astype(np.uint8)
