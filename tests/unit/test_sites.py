"""Site profiles of the synthetic source: the default build unchanged, a shifted second hospital, its CLI."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless
from scipy import ndimage
from typer.testing import CliRunner

from cxr.cli import app
from cxr.config import Config
from cxr.data.sources.base import SourceError
from cxr.data.sources.synthetic import (
    BLOCK,
    HOSPITAL_B,
    INTERNAL,
    SITE_INFO,
    SITE_MANIFEST,
    SITES,
    Scanner,
    generate,
    patient_anatomy,
    plan,
    scan,
    site_config,
    site_profile,
)
from cxr.evaluation.external_data import load_external_set
from cxr.imaging import read_image
from cxr.preprocess import PreprocessSpec, preprocess

# Derived by running plan() and generate() of the default Config on main at d99e1de, before sites existed:
# sha256 of repr(plan(Config())) and of three uncompressed files' bytes (8-bit; MONOCHROME1 + rescale + window;
# 8-bit MONOCHROME1 CR), which are ours to the byte. pydicom or numpy upgrades that change bytes would show here too.
DEFAULT_PLAN = ("4aa63196ae7f5dbd1201c73e6579762753827804046f8816f2cdf10afe6f2257", 814)
DEFAULT_FILES = {
    0: ("images/2d3539334e6730fd_0.dcm", "555db4240e102ad4f860975c27b8019559c15fac5ec7f09d90fb0ea5f4db95a3"),
    1: ("images/79d8b2878bf91ea9_0.dcm", "e6f8b96f538dfe29a3b0cf0fb72737cd5748710307c0c0dd9209d39c753f0a20"),
    4: ("images/c8e9f8cac84dba86_2.dcm", "2587dff40caa10ebd4572caab785dc6d4fcd74982c51971edb24147405fd8117"),
}
# The JPEG 2000 file's encoded bytes are the codec's (they differ between machines with one codec version), so
# what is pinned is what we wrote into it: the header elements and the pixels decoded (lossless: exactly ours).
JPEG2000_FILE = (8, "images/f28b4612f1e2effb_1.dcm")
JPEG2000_CONTENT = (
    "bedea2420e2783ba585682b1b7d41f1bcb84dfff8ef48e3168288fb32cd68f54",  # header elements but PixelData
    "fd79212a6bc2aedefe8377f1c9794d95d421c7464c52e8d0bf6e5fde98acf884",  # decoded pixel array
)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _content_sha(dicom: bytes) -> tuple[str, str, str]:
    """(transfer syntax, sha256 of the header elements but PixelData, sha256 of the decoded pixels)."""
    ds = pydicom.dcmread(io.BytesIO(dicom))
    header = "\n".join(f"{e.tag} {e.VR} {e.value!r}" for e in ds if e.keyword != "PixelData")
    return str(ds.file_meta.TransferSyntaxUID), _sha(header.encode()), _sha(ds.pixel_array.tobytes())


def test_default_build_is_unchanged_since_before_sites():
    cfg = Config().override({"data.synthetic.difficulty": 0.6})  # the default when the digests were taken
    sc = cfg.data.synthetic
    plans = plan(cfg)
    assert (_sha(repr(plans).encode()), len(plans)) == DEFAULT_PLAN
    assert plan(site_config(cfg, INTERNAL), INTERNAL) == plans
    for i, (file, digest) in DEFAULT_FILES.items():
        assert plans[i].file == file
        assert _sha(generate(plans[i], sc.seed, sc.difficulty, sc.size)) == digest
    i, file = JPEG2000_FILE
    assert plans[i].file == file
    content = _content_sha(generate(plans[i], sc.seed, sc.difficulty, sc.size))
    assert content == (JPEG2000Lossless, *JPEG2000_CONTENT)


def test_the_jpeg2000_pin_holds_whatever_bytes_the_encoder_writes(monkeypatch):
    cfg = Config().override({"data.synthetic.difficulty": 0.6})
    sc, (i, _) = cfg.data.synthetic, JPEG2000_FILE
    p = plan(cfg)[i]
    usual = generate(p, sc.seed, sc.difficulty, sc.size)
    compress = pydicom.Dataset.compress  # another codestream layout (tile-length and packet-length markers)
    monkeypatch.setattr(
        pydicom.Dataset, "compress", lambda ds, *a, **kw: compress(ds, *a, **kw, add_tlm=True, add_plt=True)
    )
    other = generate(p, sc.seed, sc.difficulty, sc.size)
    assert other != usual
    assert _content_sha(other) == _content_sha(usual) == (JPEG2000Lossless, *JPEG2000_CONTENT)


@pytest.fixture(scope="module")
def hospital_b():
    cfg = site_config(Config(), HOSPITAL_B)
    return cfg, plan(cfg, HOSPITAL_B)


def _patient_labels(plans) -> np.ndarray:
    return np.array([p.label for p in plans if p.k == 0])


def test_hospital_b_has_other_patients_case_mix_and_encodings(hospital_b):
    cfg, plans = hospital_b
    internal = plan(Config())
    assert cfg.data.synthetic.n_patients == HOSPITAL_B.n_patients == len(_patient_labels(plans))
    assert cfg.data.synthetic.size == HOSPITAL_B.size != Config().data.synthetic.size
    # prevalence: 0.25 against the internal 0.4, per patient
    assert abs(_patient_labels(plans).mean() - HOSPITAL_B.prevalence) < 0.07
    assert abs(_patient_labels(internal).mean() - Config().data.synthetic.prevalence) < 0.07
    assert max(p.k for p in plans) + 1 == HOSPITAL_B.images_per_patient_max
    # MONOCHROME1 on exactly 7 of every 10 films (3 internally); more portable AP films, older patients
    full = len(plans) // BLOCK * BLOCK
    assert sum(p.encoding.monochrome1 for p in plans[:full]) == full * 7 // 10
    assert np.mean([p.view == "AP" for p in plans]) > np.mean([p.view == "AP" for p in internal]) + 0.1
    assert np.mean([p.age for p in plans]) > np.mean([p.age for p in internal]) + 4


def test_hospital_b_patients_are_not_internal_patients(hospital_b):
    cfg, plans = hospital_b
    internal = plan(Config())
    stems = {p.file.split("/")[-1].split("_")[0] for p in plans}
    assert not stems & {p.file.split("/")[-1].split("_")[0] for p in internal}
    # other people, not renamed ones: patient 0 has another body and another diagnosis draw
    seed, d = cfg.data.synthetic.seed, cfg.data.synthetic.difficulty
    assert patient_anatomy(seed, 0, "F", d, HOSPITAL_B) != patient_anatomy(seed, 0, "F", d, INTERNAL)
    assert _patient_labels(plans)[:40].tolist() != _patient_labels(internal)[:40].tolist()


def _films(site, n=10) -> np.ndarray:
    cfg = site_config(Config(), site)
    sc = cfg.data.synthetic
    plans = plan(cfg, site)[:n]
    images = [read_image(generate(p, sc.seed, sc.difficulty, sc.size, site)) for p in plans]
    return np.stack([preprocess(im, PreprocessSpec(size=64)) for im in images]).astype(np.float32) / 255


def test_hospital_b_films_look_different_after_preprocessing():
    a, b = _films(INTERNAL), _films(HOSPITAL_B)

    def border(x):
        return np.concatenate([x[:, :2].ravel(), x[:, -2:].ravel(), x[:, :, :2].ravel(), x[:, :, -2:].ravel()])

    # collimation: black borders; the gamma darkens the mid-tones the percentile window keeps
    assert (border(b) < 0.02).mean() > 0.3 > (border(a) < 0.02).mean()
    assert b[:, 16:48, 16:48].mean() < a[:, 16:48, 16:48].mean() - 0.02


def _high_frequency(x: np.ndarray) -> float:
    return float((x - ndimage.uniform_filter(x, size=3)).std())


def test_scan_magnifies_blurs_bends_adds_noise_and_collimates():
    s = 128
    yy, xx = np.mgrid[:s, :s] - (s - 1) / 2
    disk = (np.hypot(yy, xx) < 32).astype(np.float32) * 0.5 + 0.25

    def area(img):
        return int((img > 0.5).sum())

    def rng():
        return np.random.default_rng(0)

    assert area(scan(disk, Scanner(zoom=1.25), rng())) == pytest.approx(area(disk) * 1.25**2, rel=0.05)
    assert _high_frequency(scan(disk, Scanner(blur=2.0), rng())) < _high_frequency(disk)
    assert scan(disk, Scanner(gamma=1.5), rng()).mean() < disk.mean() - 0.05
    smooth = ndimage.gaussian_filter(disk, 3)
    assert _high_frequency(scan(smooth, Scanner(noise=0.03), rng())) > _high_frequency(smooth) + 0.01
    shut = scan(disk, Scanner(collimation=0.1), rng())
    assert shut[:, :3].max() < 0.05 and shut[:3].max() < 0.05 and np.array_equal(shut[40:88, 40:88], disk[40:88, 40:88])
    assert np.array_equal(scan(disk, Scanner(), rng()), disk)


def test_unknown_site_names_the_known_ones():
    with pytest.raises(SourceError, match="known sites: internal, hospital_b"):
        site_profile("hospital_c")
    assert set(SITES) == {"internal", "hospital_b"}


def test_cli_writes_a_set_that_evaluate_external_reads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ext" / "hospital_b"
    res = CliRunner().invoke(app, ["synthesize-site", "--site", "hospital_b", "--out", str(out), "--patients", "6"])
    assert res.exit_code == 0, res.output
    manifest = (out / SITE_MANIFEST).read_text().splitlines()
    assert manifest[0] == "path,label,patient_id,view,age,sex"
    info = json.loads((out / SITE_INFO).read_text())
    assert info["site"]["name"] == "hospital_b" and info["n_images"] == len(manifest) - 1

    cfg = Config()
    by_folder = load_external_set(cfg, out, "binary", tmp_path / "w1").table
    by_csv = load_external_set(cfg, out / SITE_MANIFEST, "binary", tmp_path / "w2").table
    assert len(by_folder) == len(by_csv) == len(manifest) - 1
    assert set(by_folder["label"]) <= {"normal", "pneumonia"}
    folder_labels = dict(zip(by_folder["file"], by_folder["label"]))
    assert all(folder_labels[f] == lab for f, lab in zip(by_csv["file"], by_csv["label"]))
    assert all(f.startswith(f"{lab}/") for f, lab in folder_labels.items())
    assert by_csv["patient_key"].nunique() == 6 and by_csv[["view", "sex", "age"]].notna().all().all()
    first = pydicom.dcmread(out / by_csv["file"][0])
    assert first.Rows == HOSPITAL_B.size and first.PatientID.startswith(HOSPITAL_B.patient_prefix)

    again = CliRunner().invoke(app, ["synthesize-site", "--out", str(out), "--patients", "4"])
    assert again.exit_code == 0, again.output  # its own earlier output is replaced whole
    assert len((out / SITE_MANIFEST).read_text().splitlines()) < len(manifest)


def test_cli_refuses_unknown_site_and_a_foreign_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["synthesize-site", "--site", "hospital_c", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().splitlines() == ["error: unknown site 'hospital_c'; known sites: internal, hospital_b"]
    assert not (tmp_path / "x").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    res = CliRunner().invoke(app, ["synthesize-site", "--out", str(foreign), "--patients", "4"])
    assert res.exit_code == 2 and "was not written by synthesize-site" in res.output
    assert (foreign / "notes.txt").read_text() == "keep me"
