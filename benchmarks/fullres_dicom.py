"""A few hundred full-resolution DICOMs (1024-2000 px) for the data-path benchmark, built once and cached.

Encodings in equal thirds: uncompressed (8/12-bit), JPEG Baseline and JPEG 2000 (mostly irreversible,
some lossless), as a hospital export mixes them. The pixel templates are the real chest DICOMs in ``shared/data/dicom``
(decoded, re-encoded or copied compressed) and synthetic chests from ``cxr.data.sources.synthetic``
at 1024-2000 px; each file is a template with its own patient, UIDs and a jittered window, so no two
files are byte-identical. Nothing here is committed: the folder lives in benchmarks/work/ (gitignored).
"""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

VERSION = 2  # bump to rebuild cached sets after changing what is written
KINDS = ("uncompressed", "jpeg", "jpeg2000")
SYNTHETIC_SIZES = (1024, 1280, 1536, 1792, 2000)
# Which re-encoded images (index into: 2 real pictures, then the synthetic sizes) are lossless J2K; the
# rest are irreversible. Lossless J2K of the noisy synthetic pictures decodes ~5x slower than lossy.
LOSSLESS_J2K = (2, 3)
J2K_RATIO = 10
REAL_CHESTS = {  # file name prefix in shared/data/dicom -> encoding kind it already has
    "nih_gcp": "uncompressed",
    "siim_1.2": "jpeg",
    "siim_Fake": "jpeg",
    "wg04_RG1": "jpeg2000",
}


def ensure(out: Path, dicom_dir: Path, n: int = 300, seed: int = 0) -> pd.DataFrame:
    """The set under ``out`` (built unless an identical one is cached); returns its labels table."""
    out = Path(out)
    stamp = {"version": VERSION, "n": n, "seed": seed}
    if (out / "build.json").exists() and json.loads((out / "build.json").read_text()) == stamp:
        return pd.read_csv(out / "labels.csv")
    if out.exists():
        shutil.rmtree(out)
    (out / "files").mkdir(parents=True)
    templates = _templates(dicom_dir, seed)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        pool = templates[kind]
        data, label = pool[(i // len(KINDS)) % len(pool)]
        name = f"files/{i:04d}_{kind}.dcm"
        (out / name).write_bytes(_variant(data, i, rng))
        rows.append({"path": name, "label": label, "patient_id": f"BENCH{i:05d}", "kind": kind})
    labels = pd.DataFrame(rows)
    labels.to_csv(out / "labels.csv", index=False)
    (out / "build.json").write_text(json.dumps(stamp))
    return labels


def describe(out: Path) -> dict[str, object]:
    """Counts per encoding and the range of sizes, for the benchmark result."""
    import pydicom

    labels = pd.read_csv(Path(out) / "labels.csv")
    sides, syntaxes = [], Counter()
    for p in labels["path"]:
        ds = pydicom.dcmread(Path(out) / p, stop_before_pixels=True)
        sides.append((int(ds.Rows), int(ds.Columns)))
        syntaxes[ds.file_meta.TransferSyntaxUID.name] += 1
    return {
        "n": len(labels),
        "per_encoding": dict(Counter(labels["kind"])),
        "transfer_syntaxes": dict(syntaxes),
        "rows_cols_min": [min(s[0] for s in sides), min(s[1] for s in sides)],
        "rows_cols_max": [max(s[0] for s in sides), max(s[1] for s in sides)],
        "megapixels_mean": round(float(np.mean([r * c for r, c in sides])) / 1e6, 2),
        "megabytes": round(sum((Path(out) / p).stat().st_size for p in labels["path"]) / 1e6, 1),
    }


def _templates(dicom_dir: Path, seed: int) -> dict[str, list[tuple[bytes, str]]]:
    """Encoded DICOM files per kind: real ones as they are, and re-encodings of real and synthetic pixels."""
    from cxr.data.sources import synthetic as syn

    pools: dict[str, list[tuple[bytes, str]]] = {k: [] for k in KINDS}
    real_pixels = []
    for prefix, kind in REAL_CHESTS.items():
        path = next(Path(dicom_dir).glob(f"{prefix}*.dcm"))
        pools[kind].append((path.read_bytes(), "normal"))
        if prefix in ("nih_gcp", "wg04_RG1"):
            real_pixels.append(_display(path))
    rng = np.random.default_rng(seed)
    images = [(img, "normal") for img in real_pixels]
    for j, size in enumerate(SYNTHETIC_SIZES):
        label = j % 2
        images.append((syn.render(rng, label, 0.5, size), syn.CLASSES[label]))
    for j, (img, label) in enumerate(images):
        mono1 = j % 3 == 1
        enc = syn.Encoding(bits=12, monochrome1=mono1, window=j % 2 == 0, rescale=syn.RESCALES[j % 4])
        pools["uncompressed"].append((syn.encode(syn.make_dataset(img, enc, rng)), label))
        pools["jpeg2000"].append((_jpeg2000(img, rng, mono1, lossless=j in LOSSLESS_J2K), label))
        pools["jpeg"].append((_jpeg_baseline(img, rng, quality=85 + j % 10), label))
    return pools


def _jpeg2000(img: np.ndarray, rng: np.random.Generator, mono1: bool, lossless: bool) -> bytes:
    """12-bit JPEG 2000: lossless as the generator writes it, or irreversible at J2K_RATIO:1 like WG04's files."""
    from pydicom.uid import JPEG2000

    from cxr.data.sources import synthetic as syn

    ds = syn.make_dataset(img, syn.Encoding(bits=12, monochrome1=mono1, jpeg2000=lossless), rng)
    if not lossless:
        ds.compress(
            JPEG2000, ds.pixel_array, encoding_plugin="pylibjpeg", j2k_cr=[J2K_RATIO], generate_instance_uid=False
        )
        ds.LossyImageCompression = "01"
    return syn.encode(ds)


def _display(path: Path) -> np.ndarray:
    """A real file's picture in [0, 1] (bright = dense), through the project's own reader."""
    from cxr.imaging import read_image

    px = read_image(path).pixels
    lo, hi = np.percentile(px, [0.5, 99.5])
    return np.clip((px - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


def _jpeg_baseline(img: np.ndarray, rng: np.random.Generator, quality: int) -> bytes:
    """8-bit JPEG Baseline (Process 1) DICOM: Pillow encodes, pydicom encapsulates (it has no such encoder)."""
    from PIL import Image as PILImage
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    from cxr.data.sources import synthetic as syn

    ds = syn.make_dataset(img, syn.Encoding(bits=8), rng)
    buf = io.BytesIO()
    PILImage.fromarray(ds.pixel_array).save(buf, format="JPEG", quality=quality)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    return syn.encode(ds)


def _variant(data: bytes, i: int, rng: np.random.Generator) -> bytes:
    """The template as a new patient's file: own ids, jittered window; compressed pixel data kept as is."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PatientID = f"BENCH{i:05d}"
    ds.PatientName = f"BENCHMARK^{i:05d}"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["cxr-bench", str(i)])
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center = float(np.ravel([ds.WindowCenter])[0])
        width = float(np.ravel([ds.WindowWidth])[0])
        ds.WindowCenter = f"{center * rng.uniform(0.97, 1.03):.1f}"
        ds.WindowWidth = f"{width * rng.uniform(0.95, 1.05):.1f}"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
