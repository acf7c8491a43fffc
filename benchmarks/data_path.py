"""Data-path speed: cxr's prepared arrays + batched tensor augmentation against the per-item pipeline.

    python benchmarks/data_path.py                  # both sets, 64 and 224 px, CPU
    python benchmarks/data_path.py --device cuda    # augmentation on the GPU, pinned memory, non-blocking copies
    python benchmarks/data_path.py --only dicom --dicom-reps 3

The naive pipeline is what most projects write: torchvision ``ImageFolder`` + PIL for JPEGs, pydicom per
item for DICOMs, decode + torchvision transforms per item and every epoch, ``DataLoader`` with the same
number of workers. The cxr side is what ``cxr.train.fit`` runs per epoch: ``PreparedData.batches`` +
``cxr.data.augment.augment``, after a one-time ``ingest`` + ``prepare`` (reported separately, then
amortised over N epochs). Both sides apply the same augmentation parameters (``AugmentConfig``).

Sets: the Kermany 224-px JPEGs (shared/data/kermany224) and a few hundred full-resolution DICOMs
built once under benchmarks/work/ (see fullres_dicom.py). The machine is shared and noisy, so every
figure is a ratio of epochs run alternately in this one process (median over ``--reps``/``--dicom-reps``).
Writes benchmarks/results/data_path.json (data_path_cuda.json with --device cuda).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.transforms import v2

import fullres_dicom
from common import WORK, require_shared, write_result
from cxr.config import AugmentConfig, load_config
from cxr.data.augment import augment
from cxr.data.ingest import ingest
from cxr.data.loader import PreparedData
from cxr.data.prepare import prepare

log = logging.getLogger("data_path")
TARGETS = {"dicom_fullres": 10.0, "kermany224": 1.0}  # minimum speed-up, amortised over N epochs


# --- the naive pipeline ---------------------------------------------------------------------------


def naive_transform(size: int, aug: AugmentConfig) -> v2.Compose:
    """Per-item PIL/torchvision transforms with the same augmentation ranges as cxr's batched one."""
    return v2.Compose(
        [
            v2.Grayscale(1),
            v2.Resize((size, size), antialias=True),
            v2.RandomAffine(
                degrees=aug.rotation_deg, translate=(aug.shift, aug.shift), scale=(1 - aug.scale, 1 + aug.scale)
            ),
            v2.ColorJitter(brightness=aug.brightness, contrast=aug.contrast),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


class NaiveDicom(Dataset):
    """pydicom per item: decode, modality + VOI LUT, MONOCHROME1 flip, 8-bit, then the transforms."""

    def __init__(self, files: list[Path], labels: list[int], transform: v2.Compose) -> None:
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        import pydicom
        from PIL import Image as PILImage
        from pydicom.pixels import apply_modality_lut, apply_voi_lut

        ds = pydicom.dcmread(self.files[i])
        arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float32)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            arr = arr.max() - arr
        arr = (arr - arr.min()) * (255.0 / max(float(arr.max() - arr.min()), 1e-6))
        return self.transform(PILImage.fromarray(arr.astype(np.uint8))), self.labels[i]


def naive_epoch(loader: DataLoader, device: torch.device) -> float:
    t0 = time.perf_counter()
    for x, _ in loader:
        x = x.to(device, non_blocking=True)
    _sync(device)
    return time.perf_counter() - t0


# --- the cxr path ---------------------------------------------------------------------------------


def one_time(overrides: dict[str, Any], work: Path) -> tuple[Path, dict[str, float]]:
    """ingest (references, no copies) + prepare at every benchmarked size, timed."""
    cfg = load_config(
        overrides={
            **overrides,
            "data.copy_images": False,
            "paths.raw": str(work / "raw"),
            "paths.prepared": str(work / "prepared"),
        }
    )
    t0 = time.perf_counter()
    ingest(cfg)
    t1 = time.perf_counter()
    card = prepare(cfg)
    t2 = time.perf_counter()
    log.info("prepared %d images in %.1fs", card["n_images"], t2 - t1)
    return work / "prepared", {"ingest_seconds": t1 - t0, "prepare_seconds": t2 - t1}


def cxr_epoch(
    data: PreparedData,
    index: np.ndarray,
    batch_size: int,
    aug: AugmentConfig,
    gen: torch.Generator,
    device: torch.device,
) -> float:
    t0 = time.perf_counter()
    for x, _, _, _ in data.batches(index, batch_size, shuffle=True, generator=gen, device=device):
        x = augment(x, aug, gen)
    _sync(device)
    return time.perf_counter() - t0


# --- measurement ----------------------------------------------------------------------------------


def compare(
    name: str,
    loader: DataLoader,
    prepared: Path,
    size: int,
    naive_extra: list[float],
    reps: int,
    args: argparse.Namespace,
    device: torch.device,
    aug: AugmentConfig,
) -> tuple[dict[str, Any], float]:
    """Alternate naive and cxr epochs; ratios per repetition, medians (``naive_extra``: naive epochs timed earlier).

    Returns the figures and the median naive epoch in seconds.
    """
    t0 = time.perf_counter()
    data = PreparedData(prepared, size)
    load_s = time.perf_counter() - t0
    index = np.arange(len(data.manifest))
    gen = torch.Generator().manual_seed(0)
    cxr_epoch(data, index, args.batch_size, aug, gen, device)  # warm-up (allocator, kernels)
    naive_t, cxr_t = [], []
    for rep in range(reps):
        naive_t.append(naive_epoch(loader, device))
        # cxr epochs are short: average a few per repetition to steady the ratio
        cxr_t.append(
            statistics.fmean(
                cxr_epoch(data, index, args.batch_size, aug, gen, device) for _ in range(args.cxr_epochs_per_rep)
            )
        )
        log.info("%s %d px rep %d: naive %.2fs, cxr %.3fs", name, size, rep, naive_t[rep], cxr_t[-1])
    n_naive, n_cxr = len(loader.dataset), len(index)
    tn, tc = statistics.median(naive_t + naive_extra), statistics.median(cxr_t)
    return {
        "naive_images_per_s": round(n_naive / tn, 1),
        "cxr_images_per_s": round(n_cxr / tc, 1),
        "speedup_per_epoch": round((n_cxr / tc) / (n_naive / tn), 2),
        "speedup_per_epoch_by_rep": [round((n_cxr / c) / (n_naive / n), 2) for n, c in zip(naive_t, cxr_t)],
        "naive_epoch_seconds": [round(t, 2) for t in naive_extra + naive_t],
        "load_seconds": round(load_s, 2),
    }, tn


def amortise(f: dict[str, Any], fixed_in_epochs: float, n_ep: int) -> None:
    """Add the speed-up over ``n_ep`` epochs with a one-time cost of ``fixed_in_epochs`` naive epochs."""
    speedup = f["speedup_per_epoch"]
    f[f"speedup_amortised_{n_ep}_epochs"] = round(n_ep / (fixed_in_epochs + n_ep / speedup), 2)
    f["break_even_epochs"] = round(fixed_in_epochs / (1 - 1 / speedup), 2) if speedup > 1 else None


def run_set(name: str, naive_for_size, overrides: dict[str, Any], reps: int, args, device, aug) -> dict[str, Any]:
    """Naive epoch, prepare, naive epoch (so prepare is measured in adjacent naive epochs), then each size."""
    loaders = {
        s: DataLoader(
            naive_for_size(s),
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            pin_memory=device.type == "cuda",
        )
        for s in args.sizes
    }
    last = args.sizes[-1]
    before = naive_epoch(loaders[last], device)
    prepared, fixed = one_time(
        {**overrides, "prepare.sizes": args.sizes, "model.image_size": args.sizes[0]}, WORK / "data_path" / name
    )
    after = naive_epoch(loaders[last], device)
    fixed_in_epochs = sum(fixed.values()) / statistics.fmean([before, after])
    n = len(PreparedData(prepared, args.sizes[0]).manifest)
    out: dict[str, Any] = {
        "n_images": n,
        **{k: round(v, 1) for k, v in fixed.items()},
        "prepare_images_per_s": round(n / fixed["prepare_seconds"], 1),
        "prepare_in_naive_epochs": round(fixed_in_epochs, 2),
    }
    naive_epoch_s = {}
    for size in args.sizes:
        timed = [before, after] if size == last else []
        out[f"{size}px"], naive_epoch_s[size] = compare(
            name, loaders[size], prepared, size, timed, reps, args, device, aug
        )
    for size in args.sizes:  # the one-time cost in this size's naive epochs, plus loading the arrays (every run)
        f = out[f"{size}px"]
        fixed = fixed_in_epochs * naive_epoch_s[last] / naive_epoch_s[size] + f["load_seconds"] / naive_epoch_s[size]
        amortise(f, fixed, args.epochs)
    return out


def decode_rates(ds: "NaiveDicom", kinds: list[str], per_kind: int = 6) -> dict[str, float]:
    """Single-core images/s of the naive per-item work, per encoding (context for the mixed figure)."""
    out = {}
    for kind in dict.fromkeys(kinds):
        idx = [i for i, k in enumerate(kinds) if k == kind][:per_kind]
        t0 = time.perf_counter()
        for i in idx:
            ds[i]
        out[kind] = round(len(idx) / (time.perf_counter() - t0), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (falls back to cpu, saying so, without a GPU)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    ap.add_argument("--only", choices=["kermany", "dicom"], default=None)
    ap.add_argument("--reps", type=int, default=2, help="alternating naive/cxr repetitions per size, Kermany")
    ap.add_argument(
        "--dicom-reps",
        type=int,
        default=1,
        help="the same for the DICOM set, whose naive epochs are long (224 px adds the 2 around prepare)",
    )
    ap.add_argument("--cxr-epochs-per-rep", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30, help="N for the amortised figure (default train.epochs)")
    ap.add_argument("--workers", type=int, default=2, help="naive DataLoader workers, and cxr's prepare.workers")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--n-dicom", type=int, default=300)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("CXR_NO_PROGRESS", "1")

    device, note = resolve(args.device)
    aug = load_config().train.augment
    figures: dict[str, Any] = {
        "device_requested": args.device,
        "device": str(device),
        "note": note,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "reps": args.reps,
        "dicom_reps": args.dicom_reps,
        "amortise_epochs": args.epochs,
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_start": round(os.getloadavg()[0], 2),  # other users' work on a shared machine
    }
    common = {"prepare.workers": args.workers}
    if args.only in (None, "kermany"):
        root = require_shared("kermany224")
        folder = root / "chest_xray" / "train"
        figures["kermany224"] = run_set(
            "kermany224",
            lambda s: datasets.ImageFolder(str(folder), transform=naive_transform(s, aug)),
            {**common, "data.source": "kermany", "data.path": str(root)},
            args.reps,
            args,
            device,
            aug,
        )
    if args.only in (None, "dicom"):
        out = WORK / "data_path" / "dicom_fullres_files"
        labels = fullres_dicom.ensure(out, require_shared("dicom"), n=args.n_dicom)
        files = [out / p for p in labels["path"]]
        y = (labels["label"] == "pneumonia").astype(int).tolist()
        naive = NaiveDicom(files, y, naive_transform(args.sizes[-1], aug))
        figures["dicom_fullres"] = {
            "set": fullres_dicom.describe(out),
            "naive_single_core_images_per_s": decode_rates(naive, labels["kind"].tolist()),
            **run_set(
                "dicom_fullres",
                lambda s: NaiveDicom(files, y, naive_transform(s, aug)),
                {**common, "data.source": "manifest", "data.path": str(out / "labels.csv")},
                args.dicom_reps,
                args,
                device,
                aug,
            ),
        }
    figures["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    figures["targets"] = targets(figures, args)
    figures["summary"] = summary(figures, args)
    # named by the device asked for, so a fallback run never replaces the CPU result
    write_result("data_path" if args.device == "cpu" else "data_path_cuda", figures)


def targets(figures: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Amortised speed-up (one-time prepare included) against each set's minimum, at every size."""
    key = f"speedup_amortised_{args.epochs}_epochs"
    out = {}
    for name, minimum in TARGETS.items():
        if name in figures:
            worst = min(figures[name][f"{s}px"][key] for s in args.sizes)
            out[name] = {"min_speedup": minimum, "worst_amortised": worst, "met": worst >= minimum}
    return out


def summary(figures: dict[str, Any], args: argparse.Namespace) -> str:
    """One line for the README table."""
    key = f"speedup_amortised_{args.epochs}_epochs"
    parts = []
    for name, label in (("dicom_fullres", "full-res DICOM"), ("kermany224", "Kermany 224-px JPEG")):
        if name not in figures:
            continue
        f, t = figures[name], figures["targets"][name]
        sizes = "; ".join(
            f"{s} px {_x(f[f'{s}px']['speedup_per_epoch'])}/epoch ({f[f'{s}px']['cxr_images_per_s']:.0f} vs "
            f"{f[f'{s}px']['naive_images_per_s']:.0f} img/s), {_x(f[f'{s}px'][key])} over {args.epochs} epochs"
            for s in args.sizes
        )
        parts.append(
            f"{label} (n={f['n_images']}, prepare {f['prepare_seconds']} s = "
            f"{f['prepare_in_naive_epochs']} naive epochs): {sizes}; "
            f"target >= {t['min_speedup']:g}x {'met' if t['met'] else 'MISSED'}"
        )
    note = f" ({figures['note']})" if figures.get("note") else ""
    return f"[{figures['device']}]{note} " + " | ".join(parts)


def _x(ratio: float) -> str:
    return f"{ratio:.0f}x" if ratio >= 100 else f"{ratio:.1f}x"


def resolve(name: str) -> tuple[torch.device, str | None]:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        note = f"--device {name} requested but torch.cuda.is_available() is False: measured on CPU instead"
        log.warning(note)
        return torch.device("cpu"), note
    return device, None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
