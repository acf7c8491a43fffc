"""The synthetic DICOM source: determinism, decodability, the encoding mix, anatomy and labels."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from cxr.config import Config
from cxr.data.sources.base import MANIFEST_COLUMNS
from cxr.data.sources.synthetic import (
    BLOCK,
    Encoding,
    build,
    encode,
    make_dataset,
    patient_anatomy,
    plan,
    render,
    render_layers,
)
from cxr.data.sources.synthetic.source import _rng
from cxr.imaging import patient_key, read_image

SIZE = 64


def small_cfg(**extra):
    overrides = {"data.synthetic.n_patients": 8, "data.synthetic.size": SIZE, **extra}
    return Config().override(overrides)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = small_cfg()
    raw = tmp_path_factory.mktemp("raw")
    return cfg, raw, build(cfg, raw)


def _layers(cfg, p, **kw):
    """Re-render a planned image's layers exactly as build did."""
    sc = cfg.data.synthetic
    anatomy = patient_anatomy(sc.seed, p.patient, p.sex, sc.difficulty)
    rng = _rng(sc.seed, p.patient, p.k, 2)
    return render_layers(rng, p.label, sc.difficulty, sc.size, view=p.view, sex=p.sex, anatomy=anatomy, **kw)


def test_manifest_shape_and_notes(built):
    cfg, raw, sd = built
    m = sd.manifest
    assert list(m.columns[: len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS
    assert sd.task == "binary" and sd.classes == ["normal", "pneumonia"] and sd.files_in_raw
    assert any("synthetic" in n.lower() for n in sd.notes)
    assert set(m["source"]) == {"synthetic"}
    assert m["split"].isna().all()
    assert set(m["label"]) <= {"normal", "pneumonia"}
    assert set(m["view"]) <= {"PA", "AP"} and set(m["sex"]) <= {"M", "F"}
    assert m["age"].between(18, 100).all()
    assert m["image"].str.match(r"^images/[0-9a-f]+_\d+\.dcm$").all()
    assert len(m) >= BLOCK  # enough images for one full block of the encoding mix
    assert sorted(p.name for p in (raw / "images").iterdir()) == sorted(m["image"].str.slice(7))


def test_build_is_deterministic(built, tmp_path):
    cfg, raw, sd = built
    again = build(cfg, tmp_path)
    assert again.manifest.equals(sd.manifest)
    for rel in sd.manifest["image"]:
        a, b = (raw / rel).read_bytes(), (tmp_path / rel).read_bytes()
        assert a == b, rel  # byte-identical files, UIDs included
        assert np.array_equal(read_image(raw / rel).pixels, read_image(tmp_path / rel).pixels)


def test_other_seed_gives_other_images(built, tmp_path):
    cfg, raw, sd = built
    other = build(small_cfg(**{"data.synthetic.seed": 1}), tmp_path)
    first = other.manifest["image"][0]
    assert not np.array_equal(read_image(raw / first).pixels, read_image(tmp_path / first).pixels)


def test_every_file_decodes_with_the_mix(built):
    cfg, raw, sd = built
    kinds = set()
    for row in sd.manifest.itertuples():
        img = read_image(raw / row.image)
        ds = pydicom.dcmread(raw / row.image)
        meta = img.meta
        assert img.pixels.shape == (SIZE, SIZE)
        assert meta["body_part"] == "CHEST" and meta["modality"] in ("DX", "CR")
        assert meta["view"] == row.view and meta["sex"] == row.sex and meta["age"] == row.age
        assert str(ds.PatientID).startswith("SYN") and str(ds.PatientAge).endswith("Y")
        if meta["transfer_syntax"].startswith("JPEG 2000"):
            kinds.add("jpeg2000")
        elif ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian:
            kinds.add("explicit")
        kinds.add(meta["photometric"])
        if meta["bits"] == 12:
            assert ds.BitsAllocated == 16 and ds.HighBit == 11 and ds.pixel_array.max() <= 4095
            if "RescaleSlope" in ds and (float(ds.RescaleSlope), float(ds.RescaleIntercept)) != (1.0, 0.0):
                kinds.add("rescaled12")
        else:
            assert meta["bits"] == 8 and ds.BitsAllocated == 8
            kinds.add("8bit")
        if meta["voi"] == "window":
            kinds.add("window")
    assert kinds >= {"jpeg2000", "explicit", "MONOCHROME1", "MONOCHROME2", "rescaled12", "8bit", "window"}


def test_encoding_fractions_are_exact_per_block():
    cfg = Config().override({"data.synthetic.n_patients": 60, "data.synthetic.monochrome1_fraction": 0.3})
    plans = plan(cfg)
    full = len(plans) // BLOCK * BLOCK
    assert full >= 5 * BLOCK
    for start in range(0, full, BLOCK):
        block = plans[start : start + BLOCK]
        assert sum(p.encoding.monochrome1 for p in block) == 3
        assert sum(p.encoding.jpeg2000 for p in block) == 1


def test_monochrome1_decodes_like_its_monochrome2_twin():
    image = render(np.random.default_rng(3), 0, 0.5, SIZE)
    for enc in (
        Encoding(bits=12, rescale=(2.0, -2048.0), window=True),
        Encoding(bits=12, rescale=(0.5, 0.0)),
        Encoding(bits=8, window=True, jpeg2000=True),
        Encoding(bits=12, jpeg2000=True),
    ):
        decoded = {}
        for mono1 in (False, True):
            twin = Encoding(**{**enc.__dict__, "monochrome1": mono1})
            ds = make_dataset(image, twin, np.random.default_rng(7))
            img = read_image(encode(ds))
            assert img.meta["photometric"] == ("MONOCHROME1" if mono1 else "MONOCHROME2")
            lo, hi = img.meta["range"]
            decoded[mono1] = (img.pixels - lo) / (hi - lo)
        np.testing.assert_allclose(decoded[True], decoded[False], atol=1e-3)
        # and both look like the rendered image (bright = dense), not its negative
        assert np.corrcoef(decoded[True].ravel(), image.ravel())[0, 1] > 0.99


def test_decoded_files_show_dark_lungs_and_bright_mediastinum(built):
    cfg, raw, sd = built
    seen = set()
    for p in plan(cfg):
        img = read_image(raw / p.file)
        lungs = _layers(cfg, p).lung_mask
        c = SIZE // 2
        mediastinum = img.pixels[SIZE // 4 : SIZE // 2, c - SIZE // 32 : c + SIZE // 32]
        assert img.pixels[lungs].mean() < mediastinum.mean(), p.file
        seen.add(img.meta["photometric"])
    assert seen == {"MONOCHROME1", "MONOCHROME2"}


def test_files_match_the_rendered_image(built):
    """The stored pixels are the rendered image (up to the detector's linear gain and quantisation)."""
    cfg, raw, sd = built
    for p in plan(cfg)[:6]:
        img = read_image(raw / p.file).pixels
        rendered = _layers(cfg, p).image
        assert np.corrcoef(img.ravel(), rendered.ravel())[0, 1] > 0.995


def test_consolidations_only_inside_the_lungs():
    for seed in range(6):
        for difficulty in (0.0, 0.6, 1.0):
            r = render_layers(np.random.default_rng(seed), "pneumonia", difficulty, 96, lesion_free=True)
            changed = r.image != r.lesion_free
            assert changed.any(), (seed, difficulty)
            assert not (changed & ~r.lung_mask).any()
            assert (r.lesion[~r.lung_mask] == 0).all() and r.lesion.max() > 0
            assert r.image[changed].mean() > r.lesion_free[changed].mean()  # consolidation = denser
        normal = render_layers(np.random.default_rng(seed), "normal", 0.6, 96, lesion_free=True)
        assert (normal.lesion == 0).all() and np.array_equal(normal.image, normal.lesion_free)


def test_difficulty_makes_lesions_subtler():
    def strength(d):
        return np.mean([render_layers(np.random.default_rng(s), 1, d, 64).lesion.sum() for s in range(12)])

    assert strength(0.0) > 1.5 * strength(1.0)


def test_render_is_a_plausible_deterministic_radiograph():
    a = render(np.random.default_rng(11), 0, 0.6, 128)
    b = render(np.random.default_rng(11), 0, 0.6, 128)
    c = render(np.random.default_rng(12), 0, 0.6, 128)
    assert a.dtype == np.float32 and a.shape == (128, 128)
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    heart_right = 0
    for seed in range(8):
        r = render_layers(np.random.default_rng(seed), 0, 0.6, 128)
        s = 128
        assert r.image[:4, :4].mean() < r.image[r.lung_mask].mean()  # air darker than lungs
        assert r.image[r.lung_mask].mean() < r.image[s // 4 : s // 2, s // 2 - 3 : s // 2 + 3].mean()
        heart_right += r.lung_mask[:, s // 2 :].sum() < r.lung_mask[:, : s // 2].sum()
    assert heart_right == 8  # the heart takes lung area on the image right (the patient's left)


@pytest.mark.parametrize("prevalence", [0.2, 0.4])
def test_labels_follow_prevalence_per_patient(prevalence):
    cfg = Config().override({"data.synthetic.n_patients": 1500, "data.synthetic.prevalence": prevalence})
    plans = plan(cfg)
    by_patient: dict[int, set[int]] = {}
    for p in plans:
        by_patient.setdefault(p.patient, set()).add(p.label)
    assert len(by_patient) == 1500 and all(len(v) == 1 for v in by_patient.values())
    frac = np.mean([next(iter(v)) for v in by_patient.values()])
    assert abs(frac - prevalence) < 0.04
    counts = np.bincount([p.patient for p in plans])
    assert counts.min() == 1 and counts.max() == cfg.data.synthetic.images_per_patient_max


def test_patient_keys_shared_and_no_raw_ids(built):
    cfg, raw, sd = built
    m = sd.manifest
    keys = m.groupby("patient_key").size()
    assert len(keys) == cfg.data.synthetic.n_patients
    for p in plan(cfg):
        assert m.loc[p.index, "patient_key"] == patient_key(f"SYN{p.patient:05d}", "synthetic")
    assert (m.groupby("patient_key")["label"].nunique() == 1).all()
    text = m.to_csv(index=False)
    assert "SYN0" not in text.upper() and "PATIENT0" not in text.upper()


def test_rebuild_smaller_removes_stale_files(tmp_path):
    build(small_cfg(), tmp_path)
    small = build(small_cfg(**{"data.synthetic.n_patients": 4}), tmp_path)
    on_disk = sorted(f"images/{p.name}" for p in (tmp_path / "images").iterdir())
    assert on_disk == sorted(small.manifest["image"])
