"""TorchXRayVision's published DenseNet121 weights by name (``cxr import-weights --download NAME``).

The file is fetched from TorchXRayVision's GitHub release into the torch hub cache (used as is when already there),
then converted like any checkpoint; offline, the download fails with what to do instead. The release publishes no
checksums: the JSON records the file's sha256.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cxr.models.networks import ModelError

RELEASE = "https://github.com/mlmed/torchxrayvision/releases/download/v1/"
# The 18 outputs of every TorchXRayVision DenseNet, in order (xrv.datasets.default_pathologies).
LABELS = (
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
    "Lung Lesion",
    "Fracture",
    "Lung Opacity",
    "Enlarged Cardiomediastinum",
)
_TAIL = "densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
_CHEX_UNTRAINED = {"Infiltration", "Emphysema", "Fibrosis", "Pleural_Thickening", "Nodule", "Mass", "Hernia"}
# name -> (release file, outputs the set was not trained on: "" in the label order, as TorchXRayVision lists them)
WEIGHTS: dict[str, tuple[str, set[str]]] = {
    "densenet121-res224-all": (f"nih-pc-chex-mimic_ch-google-openi-kaggle-{_TAIL}", set()),
    "densenet121-res224-nih": (
        f"nih-{_TAIL}",
        {"Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"},
    ),
    "densenet121-res224-pc": (f"pc-{_TAIL}", {"Lung Lesion", "Lung Opacity", "Enlarged Cardiomediastinum"}),
    "densenet121-res224-chex": (f"chex-{_TAIL}", _CHEX_UNTRAINED),
    "densenet121-res224-rsna": (f"kaggle-{_TAIL}", set(LABELS) - {"Pneumonia", "Lung Opacity"}),
    "densenet121-res224-mimic_nb": (f"mimic_nb-{_TAIL}", _CHEX_UNTRAINED),
    "densenet121-res224-mimic_ch": (f"mimic_ch-{_TAIL}", _CHEX_UNTRAINED),
}


def labels_of(name: str) -> list[str]:
    untrained = _entry(name)[1]
    return [label if label not in untrained else "" for label in LABELS]


def _entry(name: str) -> tuple[str, set[str]]:
    if name not in WEIGHTS:
        raise ModelError(f"unknown TorchXRayVision weights {name!r}; known: {', '.join(WEIGHTS)}")
    return WEIGHTS[name]


def download(name: str) -> Path:
    """The checkpoint ``name`` in the torch hub cache, downloaded if it is not there yet."""
    file = _entry(name)[0]
    url = RELEASE + file
    path = Path(torch.hub.get_dir()) / "checkpoints" / file
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except Exception as exc:
        raise ModelError(
            f"could not download TorchXRayVision weights {name} from {url} ({type(exc).__name__}: {exc}); "
            f"offline, fetch that file elsewhere and run `cxr import-weights FILE --out DIR` on it"
        ) from None
    return path
