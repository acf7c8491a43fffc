"""vgg19, inception_v3 and mlp through the same tail as every network: one epoch on tiny synthetic films, the
threshold on validation, the card, the MLflow registry, and answers from the served ``models:/NAME/VERSION``."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxr.config import Config
from cxr.data.ingest import ingest
from cxr.data.prepare import prepare
from cxr.serving.served import ServedModel
from cxr.tracking.registry import register
from cxr.training.fit import fit
from support.films import chest_dicom
from support.tiny import TINY_STUDY

pytestmark = pytest.mark.slow

FAST = [  # one epoch of one batch: these networks are heavy for CPU tests
    "data.synthetic.n_patients=40",
    "prepare.sizes=[32,75]",  # 75: inception_v3's smallest input
    "train.epochs=1",
    "train.batch_size=8",
    "train.max_train_batches=1",
    "ood.max_fit_images=10",
]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Config:
    root = tmp_path_factory.mktemp("archs")
    paths = [f"paths.{name}={root / name}" for name in ("raw", "prepared", "reports")]
    store = [f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}", f"mlflow.artifact_location={root / 'artifacts'}"]
    cfg = Config().override([*TINY_STUDY, *FAST, *paths, *store])
    ingest(cfg)
    prepare(cfg)
    return cfg


@pytest.mark.parametrize("arch,size", [("vgg19", 32), ("inception_v3", 75), ("mlp", 32)])
def test_new_arch_trains_registers_and_is_served(project: Config, tmp_path: Path, arch: str, size: int) -> None:
    cfg = project.override(
        {"model.arch": arch, "model.image_size": size, "paths.model": str(tmp_path / "model"),
         "mlflow.registered_model": f"cxr-{arch}"}
    )  # fmt: skip
    if arch == "inception_v3":  # its 2048-channel stages make the check's fit slow; test_ood reads its stages
        cfg = cfg.override({"ood.method": "none"})
    result = fit(cfg)
    assert result.epochs_trained == 1 and result.threshold is not None
    version = register(cfg)
    served = ServedModel.load(cfg, uri=f"models:/cxr-{arch}/{version.version}")
    card = served.predictor.card
    assert card.architecture["arch"] == arch and card.preprocess_spec.size == size
    assert (card.ood is None) == (arch != "vgg19")  # mlp: no spatial feature map for the check to read
    uploads = [chest_dicom(seed, 96, label=seed % 2) for seed in range(2)]
    answers, expected = served.predict(uploads), served.predictor.predict_files(uploads)
    for got, want in zip(answers, expected):
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)
        assert got["ood"]["checked"] == (arch == "vgg19")
    explained = served.explain(uploads[0])
    if arch == "mlp":  # refused in one line, as for the linear baseline
        assert "no convolutional feature map" in explained["error"]
    else:
        assert explained["png"][:8] == b"\x89PNG\r\n\x1a\n"
