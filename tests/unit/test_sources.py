"""Each raw source on a tiny fixture in its real layout: labels, classes, splits, patient keys, errors."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxr.config import Config
from cxr.data.sources import SourceError, build_source, medmnist
from cxr.data.sources.kermany import kermany_patient_id
from cxr.data.sources.nih import NIH_FINDINGS, parse_table
from cxr.data.sources.rsna import parse_labels
from cxr.imaging import patient_key

RNG = np.random.default_rng(0)


def config(source: str, path: Path | None, **data) -> Config:
    overrides = {"data.source": source, "data.path": None if path is None else str(path)}
    overrides.update({f"data.{k}": v for k, v in data.items()})
    return Config().override(overrides)


def noise(size: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, (size, size), dtype=np.uint8)


def write_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(noise())
    if path.suffix.lower() in (".jpeg", ".jpg"):
        im.convert("RGB").save(path, format="JPEG")  # the Kaggle JPEGs are 3-channel
    else:
        im.save(path, format="PNG")
    return path


def write_dicom(path: Path, patient_id: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality, ds.ViewPosition, ds.PatientSex, ds.PatientAge = patient_id, "CR", "PA", "F", "045Y"
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = noise().tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_no_raw_ids(df: pd.DataFrame, raw_ids: list[str]) -> None:
    """Raw ids appear in no column; ``image`` is exempt where the source's own file names hold them."""
    assert not {"patient_id", "patientId", "Patient ID"} & set(df.columns)
    for col in df.columns.drop("image"):
        cells = [str(cell) for cell in df[col]]
        for raw in raw_ids:
            assert not any(raw in cell for cell in cells), f"raw id {raw!r} found in column {col!r}"


def keys_by(df: pd.DataFrame, column: str) -> dict[str, str]:
    return dict(zip(df[column], df["patient_key"]))


# --- kermany --------------------------------------------------------------------------------------

KERMANY_FILES = {
    "train/NORMAL": [
        "IM-0115-0001.jpeg",
        "IM-0115-0002.jpeg",
        "NORMAL2-IM-0246-0001.jpeg",
        "NORMAL2-IM-0246-0001-0002.jpeg",
        "odd_name.jpeg",
    ],
    "train/PNEUMONIA": ["person1000_bacteria_2931.jpeg", "person1000_virus_1681.jpeg", "person7_virus_15_2.jpeg"],
    "test/NORMAL": ["IM-0001-0001.jpeg"],
    "test/PNEUMONIA": ["person3_bacteria_10.jpeg"],
}
KERMANY_IDS = ["IM-0115", "NORMAL2-IM-0246", "person1000", "person7", "IM-0001", "person3"]


@pytest.fixture
def kermany_dir(tmp_path: Path) -> Path:
    root = tmp_path / "kaggle" / "chest_xray"
    for folder, names in KERMANY_FILES.items():
        for name in names:
            write_image(root / folder / name)
    (root / "train" / "NORMAL" / "._IM-0115-0001.jpeg").write_bytes(b"macOS resource fork")
    (root / "train" / "NORMAL" / ".DS_Store").write_bytes(b"")
    return tmp_path / "kaggle"


@pytest.mark.parametrize(
    ("name", "pid"),
    [
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("person1000_virus_1681.jpeg", "person1000"),
        ("person7_virus_15_2.jpeg", "person7"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("IM-0429-0001-0002.jpeg", "IM-0429"),
        ("NORMAL2-IM-0246-0001.jpeg", "NORMAL2-IM-0246"),
        ("NORMAL2-IM-0246-0001-0002.jpeg", "NORMAL2-IM-0246"),
        ("scan.jpeg", None),
        ("IM-0115.jpeg", None),
    ],
)
def test_kermany_patient_id(name: str, pid: str | None) -> None:
    assert kermany_patient_id(name) == pid


def test_kermany_labels_splits_and_patients(kermany_dir: Path, tmp_path: Path) -> None:
    data = build_source(config("kermany", kermany_dir), tmp_path / "raw")
    df = data.manifest
    assert (data.task, data.classes, data.files_in_raw) == ("binary", ["normal", "pneumonia"], False)
    assert len(df) == sum(len(v) for v in KERMANY_FILES.values())  # hidden files skipped
    by_name = df.assign(name=df["image"].map(lambda p: Path(p).name)).set_index("name")
    for folder, names in KERMANY_FILES.items():
        split, cls = folder.split("/")
        assert set(by_name.loc[names, "split"]) == {split}
        assert set(by_name.loc[names, "label"]) == {cls.lower()}
    assert by_name.loc["person1000_bacteria_2931.jpeg", "subtype"] == "bacteria"
    assert by_name.loc["person7_virus_15_2.jpeg", "subtype"] == "virus"
    assert by_name.loc["IM-0115-0001.jpeg", "subtype"] == "normal"
    keys = by_name["patient_key"]
    assert keys["IM-0115-0001.jpeg"] == keys["IM-0115-0002.jpeg"] == patient_key("IM-0115", "kermany")
    assert keys["NORMAL2-IM-0246-0001.jpeg"] == keys["NORMAL2-IM-0246-0001-0002.jpeg"]
    assert keys["person1000_bacteria_2931.jpeg"] == keys["person1000_virus_1681.jpeg"]
    assert keys["IM-0115-0001.jpeg"] != keys["NORMAL2-IM-0246-0001.jpeg"]
    assert df["patient_key"].nunique() == len(KERMANY_IDS) + 1  # + odd_name.jpeg on its own
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["image"])
    assert any("1 file names have no Kermany patient id" in n for n in data.notes)
    assert_no_raw_ids(df, KERMANY_IDS)


@pytest.mark.parametrize("sub", ["chest_xray", "chest_xray/train"])
def test_kermany_accepts_inner_folders(kermany_dir: Path, tmp_path: Path, sub: str) -> None:
    df = build_source(config("kermany", kermany_dir / sub), tmp_path / "raw").manifest
    if sub.endswith("train"):  # class folders directly: no official split
        assert len(df) == 8 and df["split"].isna().all()
    else:
        assert len(df) == 10 and set(df["split"]) == {"train", "test"}


def test_kermany_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        build_source(config("kermany", tmp_path / "nope"), tmp_path / "raw")
    with pytest.raises(SourceError, match="data.path is not set"):
        build_source(config("kermany", None), tmp_path / "raw")
    (tmp_path / "empty" / "chest_xray" / "train" / "NORMAL").mkdir(parents=True)
    with pytest.raises(SourceError, match="no images found"):
        build_source(config("kermany", tmp_path / "empty"), tmp_path / "raw")


# --- medmnist -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(url: str, dest: Path) -> None:
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr(medmnist, "_fetch", refuse)


def write_npz(path: Path, n_labels: int = 1) -> dict[str, np.ndarray]:
    counts = {"train": 4, "val": 2, "test": 3}
    arrays = {}
    for split, n in counts.items():
        arrays[f"{split}_images"] = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = RNG.integers(0, 2, (n, n_labels), dtype=np.uint8)
    arrays["train_labels"][:2, :] = [[0] * n_labels, [1] * n_labels]  # both classes present for sure
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("point_at", ["file", "folder"])
def test_pneumoniamnist_exports_pngs(tmp_path: Path, point_at: str) -> None:
    npz = tmp_path / "src" / "pneumoniamnist.npz"
    arrays = write_npz(npz)
    raw = tmp_path / "raw"
    data = build_source(config("medmnist", npz if point_at == "file" else npz.parent), raw)
    df = data.manifest
    assert (data.task, data.classes, data.files_in_raw) == ("binary", ["normal", "pneumonia"], True)
    assert df.groupby("split").size().to_dict() == {"train": 4, "val": 2, "test": 3}
    for split in ("train", "val", "test"):
        rows = df[df["split"] == split].reset_index(drop=True)
        expected = [["normal", "pneumonia"][v] for v in arrays[f"{split}_labels"][:, 0]]
        assert rows["label"].tolist() == expected
        for i, rel in enumerate(rows["image"]):
            assert rel == f"images/{split}_{i:05d}.png"
            with Image.open(raw / rel) as im:
                assert im.mode == "L"
                np.testing.assert_array_equal(np.asarray(im), arrays[f"{split}_images"][i])
    assert df.loc[0, "patient_key"] == patient_key("train-0", "medmnist")
    assert df["patient_key"].is_unique
    assert any("no patient ids" in n for n in data.notes)


def test_chestmnist_multilabel(tmp_path: Path) -> None:
    npz = tmp_path / "chestmnist.npz"
    arrays = write_npz(npz, n_labels=14)
    arrays["train_labels"][2] = 0
    arrays["train_labels"][3] = [1] + [0] * 12 + [1]
    np.savez(npz, **arrays)
    data = build_source(config("medmnist", npz, medmnist_flavor="chestmnist"), tmp_path / "raw")
    assert data.task == "multilabel"
    assert data.classes == NIH_FINDINGS and len(data.classes) == 14 and "Pleural_Thickening" in data.classes
    train = data.manifest[data.manifest["split"] == "train"]["label"].tolist()
    assert train[0] == "" and train[1] == "|".join(NIH_FINDINGS)
    assert train[2] == "" and train[3] == "Atelectasis|Hernia"


def test_medmnist_download_is_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fixture = tmp_path / "fixture.npz"
    write_npz(fixture)
    calls = []

    def fake_fetch(url: str, dest: Path) -> None:
        calls.append(url)
        dest.write_bytes(fixture.read_bytes())

    monkeypatch.setattr(medmnist, "_fetch", fake_fetch)
    raw = tmp_path / "raw"
    with pytest.raises(SourceError, match="md5"):  # the fixture is not the official file
        build_source(config("medmnist", None), raw)
    assert not list((raw / "_download").iterdir())  # nothing unverified is kept
    digest = hashlib.md5(fixture.read_bytes()).hexdigest()
    monkeypatch.setitem(medmnist.MD5, ("pneumoniamnist", 28), digest)
    data = build_source(config("medmnist", None), raw)
    assert calls == ["https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1"] * 2
    assert (raw / "_download" / "pneumoniamnist.npz").is_file() and len(data.manifest) == 9
    build_source(config("medmnist", None), raw)  # a verified download is reused
    assert len(calls) == 2


def test_medmnist_network_failure_says_where_to_put_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, dest: Path) -> None:
        dest.write_bytes(b"partial")
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(medmnist, "_fetch", offline)
    raw = tmp_path / "raw"
    with pytest.raises(SourceError, match="put it at .*_download.*pneumoniamnist.npz"):
        build_source(config("medmnist", tmp_path / "missing_folder"), raw)
    assert not list((raw / "_download").iterdir())


def test_medmnist_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "pneumoniamnist.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(SourceError, match="not a readable MedMNIST"):
        build_source(config("medmnist", bad), tmp_path / "raw")
    np.savez(bad, train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.array([[0], [2]]))
    with pytest.raises(SourceError, match="0/1 label"):
        build_source(config("medmnist", bad), tmp_path / "raw")


# --- rsna -----------------------------------------------------------------------------------------

RSNA_ROWS = [  # patientId, x, y, width, height, Target: several rows = several boxes
    ("aaaa-1111", 10, 10, 5, 5, 1),
    ("aaaa-1111", 20, 20, 5, 5, 1),
    ("bbbb-2222", "", "", "", "", 0),
    ("cccc-3333", 1, 2, 3, 4, 1),
    ("dddd-4444", "", "", "", "", 0),  # no DICOM: dropped
]
RSNA_IDS = ["aaaa-1111", "bbbb-2222", "cccc-3333", "dddd-4444"]


def rsna_csv_text() -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["patientId", "x", "y", "width", "height", "Target"])
    writer.writerows(RSNA_ROWS)
    return out.getvalue()


@pytest.mark.parametrize("zipped", [False, True])
def test_rsna_labels_and_dicoms(tmp_path: Path, zipped: bool) -> None:
    root = tmp_path / "rsna"
    root.mkdir()
    if zipped:  # the real file's name and packing
        with zipfile.ZipFile(root / "kaggle_stage_2_train_labels.csv.zip", "w") as zf:
            zf.writestr("stage_2_train_labels.csv", rsna_csv_text())
        image_dir = root / "some" / "dicoms"
    else:
        (root / "stage_2_train_labels.csv").write_text(rsna_csv_text())
        image_dir = root / "stage_2_train_images"
    for pid in RSNA_IDS[:3]:
        write_dicom(image_dir / f"{pid}.dcm", pid)
    data = build_source(config("rsna", root), tmp_path / "raw")
    df = data.manifest
    assert (data.task, data.classes, data.files_in_raw) == ("binary", ["normal", "pneumonia"], False)
    by_file = df.assign(pid=df["image"].map(lambda p: Path(p).stem)).set_index("pid")
    expected = {"aaaa-1111": "pneumonia", "bbbb-2222": "normal", "cccc-3333": "pneumonia"}
    assert by_file["label"].to_dict() == expected
    assert by_file["boxes"].to_dict() == {"aaaa-1111": 2, "bbbb-2222": 0, "cccc-3333": 1}
    assert by_file.loc["aaaa-1111", "patient_key"] == patient_key("aaaa-1111", "rsna")
    assert df["patient_key"].is_unique and df[["view", "age", "sex"]].isna().all().all()
    assert any("1 of 4 labelled patients dropped" in n for n in data.notes)
    assert_no_raw_ids(df, RSNA_IDS)


def test_rsna_errors(tmp_path: Path) -> None:
    (tmp_path / "stage_2_train_labels.csv").write_text(rsna_csv_text())
    with pytest.raises(SourceError, match="none of the 4 labelled patients"):
        build_source(config("rsna", tmp_path), tmp_path / "raw")
    (tmp_path / "stage_2_train_labels.csv").write_text("patientId,x,y\nabc,1,2\n")
    with pytest.raises(SourceError, match="Target"):
        build_source(config("rsna", tmp_path), tmp_path / "raw")
    (tmp_path / "stage_2_train_labels.csv").unlink()
    with pytest.raises(SourceError, match="no stage_2_train_labels.csv"):
        build_source(config("rsna", tmp_path), tmp_path / "raw")


def test_rsna_parse_labels_rejects_bad_target(tmp_path: Path) -> None:
    bad = tmp_path / "labels.csv"
    bad.write_text("patientId,Target\na,1\nb,2\n")
    with pytest.raises(SourceError, match="Target other than 0 or 1"):
        parse_labels(bad)


# --- covid radiography ----------------------------------------------------------------------------

COVID_COUNTS = {"COVID": 2, "Lung_Opacity": 3, "Normal": 4, "Viral Pneumonia": 2}


@pytest.fixture
def covid_dir(tmp_path: Path) -> Path:
    root = tmp_path / "download" / "COVID-19_Radiography_Dataset"
    for folder, n in COVID_COUNTS.items():
        for i in range(1, n + 1):
            # Viral Pneumonia keeps its images directly in the class folder (older releases).
            sub = root / folder if folder == "Viral Pneumonia" else root / folder / "images"
            write_image(sub / f"{folder}-{i}.png")
            write_image(root / folder / "masks" / f"{folder}-{i}.png")
    return root


def test_covid_radiography_classes(covid_dir: Path, tmp_path: Path) -> None:
    data = build_source(config("covid_radiography", covid_dir), tmp_path / "raw")
    df = data.manifest
    assert (data.task, data.classes) == ("multiclass", ["covid", "lung_opacity", "normal", "viral_pneumonia"])
    expected = {"covid": 2, "lung_opacity": 3, "normal": 4, "viral_pneumonia": 2}
    assert df["label"].value_counts().to_dict() == expected
    assert not df["image"].str.contains("masks").any()
    assert df["patient_key"].is_unique and df["split"].isna().all()
    assert any("no patient ids" in n for n in data.notes)
    # The folder holding the unpacked archive works too.
    assert len(build_source(config("covid_radiography", covid_dir.parent), tmp_path / "raw").manifest) == 11


def test_covid_balance_is_seeded(covid_dir: Path, tmp_path: Path) -> None:
    def picked(seed: int) -> list[str]:
        cfg = config("covid_radiography", covid_dir, covid_balance=True).override({"project.seed": seed})
        data = build_source(cfg, tmp_path / "raw")
        assert data.manifest["label"].value_counts().to_dict() == dict.fromkeys(data.classes, 2)
        assert any("downsampled to 2" in n for n in data.notes)
        return data.manifest["image"].tolist()

    assert picked(7) == picked(7)
    assert len({tuple(picked(seed)) for seed in range(8)}) > 1  # the seed actually chooses


def test_covid_missing_class_folder(covid_dir: Path, tmp_path: Path) -> None:
    for p in sorted((covid_dir / "Lung_Opacity").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (covid_dir / "Lung_Opacity").rmdir()
    with pytest.raises(SourceError, match="lung_opacity"):
        build_source(config("covid_radiography", covid_dir), tmp_path / "raw")


# --- nih ------------------------------------------------------------------------------------------

NIH_HEADER = [
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
]
NIH_ROWS = [
    ["00931337_000.png", "Cardiomegaly|Emphysema", "0", "931337", "58", "M", "PA", "2682", "2749"],
    ["00931337_001.png", "No Finding", "1", "931337", "59", "M", "AP", "2500", "2048"],
    ["00842424_000.png", "Hernia", "0", "842424", "414", "F", "PA", "2048", "2500"],
    ["00777777_000.png", "Effusion|Atelectasis", "0", "777777", "30", "F", "AP", "2048", "2048"],
]
NIH_IDS = ["931337", "842424", "777777"]


def write_nih_table(path: Path, rows: list[list[str]] = NIH_ROWS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(NIH_HEADER)
    writer.writerows(rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.getvalue().encode()))
    else:
        path.write_text(text.getvalue())
    return path


@pytest.fixture
def nih_dir(tmp_path: Path) -> Path:
    root = tmp_path / "nih"
    write_nih_table(root / "Data_Entry_2017_v2020.csv.gz")
    write_image(root / "images_001" / "images" / "00931337_000.png")
    write_image(root / "images_001" / "images" / "00931337_001.png")
    write_image(root / "images_002" / "images" / "00842424_000.png")
    (root / "train_val_list.txt").write_text("00931337_000.png\n00931337_001.png\n00777777_000.png\n")
    (root / "test_list.txt").write_text("00842424_000.png\n")
    return root


def test_nih_multilabel(nih_dir: Path, tmp_path: Path) -> None:
    data = build_source(config("nih", nih_dir), tmp_path / "raw")
    assert (data.task, data.classes, data.files_in_raw) == ("multilabel", NIH_FINDINGS, False)
    df = data.manifest.assign(name=lambda d: d["image"].map(lambda p: Path(p).name)).set_index("name")
    assert df["label"].to_dict() == {
        "00931337_000.png": "Cardiomegaly|Emphysema",
        "00931337_001.png": "",
        "00842424_000.png": "Hernia",
    }
    expected = {"00931337_000.png": "train", "00931337_001.png": "train", "00842424_000.png": "test"}
    assert df["split"].to_dict() == expected
    assert df.loc["00931337_000.png", ["view", "age", "sex", "follow_up"]].tolist() == ["PA", 58, "M", 0]
    assert df.loc["00931337_001.png", ["view", "follow_up"]].tolist() == ["AP", 1]
    assert pd.isna(df.loc["00842424_000.png", "age"])  # 414 years is a data error
    keys = df["patient_key"]
    assert keys["00931337_000.png"] == keys["00931337_001.png"] == patient_key("931337", "nih")
    assert keys["00931337_000.png"] != keys["00842424_000.png"]
    assert any("1 of 4 table rows dropped" in n for n in data.notes)
    assert_no_raw_ids(data.manifest, NIH_IDS)


def test_nih_first_finding(nih_dir: Path, tmp_path: Path) -> None:
    data = build_source(config("nih", nih_dir, nih_mode="first_finding"), tmp_path / "raw")
    assert data.task == "multiclass" and data.classes == ["No Finding", *NIH_FINDINGS]
    assert sorted(data.manifest["label"]) == ["Cardiomegaly", "Hernia", "No Finding"]


def test_nih_parse_table_needs_no_images(tmp_path: Path) -> None:
    table = parse_table(write_nih_table(tmp_path / "Data_Entry_2017.csv"), "multilabel")
    assert len(table) == 4
    # Canonical class order, not the table's order.
    assert table.loc[3, "label"] == "Atelectasis|Effusion"
    assert parse_table(tmp_path / "Data_Entry_2017.csv", "first_finding").loc[3, "label"] == "Effusion"


def test_nih_without_split_lists(nih_dir: Path, tmp_path: Path) -> None:
    (nih_dir / "train_val_list.txt").unlink()
    (nih_dir / "test_list.txt").unlink()
    data = build_source(config("nih", nih_dir), tmp_path / "raw")
    assert data.manifest["split"].isna().all()
    assert any("no official split" in n for n in data.notes)


def test_nih_bad_tables(tmp_path: Path) -> None:
    bad = [*NIH_ROWS[:1], ["00000002_000.png", "Pneumonia|Covid", "0", "2", "40", "F", "PA", "1", "1"]]
    with pytest.raises(SourceError, match="unknown finding names \\['Covid'\\]"):
        parse_table(write_nih_table(tmp_path / "bad.csv", bad), "multilabel")
    (tmp_path / "cols.csv").write_text("Image Index,Finding Labels\na.png,Hernia\n")
    with pytest.raises(SourceError, match="Patient ID"):
        parse_table(tmp_path / "cols.csv", "multilabel")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no Data_Entry_2017"):
        build_source(config("nih", tmp_path / "empty"), tmp_path / "raw")


# --- manifest -------------------------------------------------------------------------------------


def write_manifest(root: Path, header: list[str], rows: list[list[str]], images: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if images:
        for row in rows:
            if not Path(row[0]).is_absolute():
                write_image(root / row[0])
    with (root / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return root / "labels.csv"


def test_manifest_binary(tmp_path: Path) -> None:
    header = ["path", "label", "patient_id", "view", "age", "sex", "split", "name"]
    rows = [
        ["img/a.png", "abnormal", "MRN-0042", "pa", "61", "female", "train", "Jane Roe"],
        ["img/b.png", "normal", "MRN-0042", "AP", "61", "F", "validation", "Jane Roe"],
        ["img/c.png", "normal", "MRN-0099", "", "", "male", "test", "John Doe"],
        ["img/d.png", "abnormal", "", "PA", "30", "M", "", "Jim Poe"],
    ]
    csv_path = write_manifest(tmp_path / "team", header, rows)
    data = build_source(config("manifest", csv_path), tmp_path / "raw")
    df = data.manifest
    assert (data.task, data.classes, data.files_in_raw) == ("binary", ["normal", "abnormal"], False)
    assert df["label"].tolist() == ["abnormal", "normal", "normal", "abnormal"]
    assert df["image"].tolist() == [str((tmp_path / "team" / r[0]).resolve()) for r in rows]
    assert df["view"].tolist()[:2] == ["PA", "AP"] and df["sex"].tolist() == ["F", "F", "M", "M"]
    assert df["split"].tolist()[:3] == ["train", "val", "test"]
    assert df.loc[0, "patient_key"] == df.loc[1, "patient_key"] == patient_key("MRN-0042", "manifest")
    assert df["patient_key"].nunique() == 3 and df["patient_key"].notna().all()
    assert "name" not in df.columns and any("name" in n and "dropped" in n for n in data.notes)
    assert any("1 images have no patient_id" in n for n in data.notes)
    assert_no_raw_ids(df, ["MRN-0042", "MRN-0099", "Jane Roe", "John Doe"])


@pytest.mark.parametrize(
    ("labels", "positive", "classes"),
    [
        (["0", "1"], None, ["0", "1"]),
        (["pneumonia", "normal"], None, ["normal", "pneumonia"]),
        (["covid", "normal"], None, ["normal", "covid"]),
        (["cat", "dog"], "cat", ["dog", "cat"]),
    ],
)
def test_manifest_positive_class_is_second(tmp_path: Path, labels, positive, classes) -> None:
    rows = [[f"{i}.png", lab] for i, lab in enumerate(labels * 2)]
    csv_path = write_manifest(tmp_path, ["path", "label"], rows)
    data = build_source(config("manifest", csv_path, positive_label=positive), tmp_path / "raw")
    assert data.classes == classes


def test_manifest_multilabel_and_multiclass(tmp_path: Path) -> None:
    rows = [["a.png", "b|a"], ["b.png", ""], ["c.png", "a"], ["/nowhere/x.png", "c"]]
    csv_path = write_manifest(tmp_path, ["image", "labels"], rows)
    data = build_source(config("manifest", csv_path, manifest_task="multilabel"), tmp_path / "raw")
    assert data.task == "multilabel" and data.classes == ["a", "b", "c"]
    assert data.manifest["label"].tolist() == ["a|b", "", "a"]
    assert any("1 of 4 rows dropped" in n for n in data.notes)
    rows = [["a.png", "zeta"], ["b.png", "alpha"], ["c.png", "mid"]]
    csv_path = write_manifest(tmp_path / "mc", ["path", "label"], rows)
    data = build_source(config("manifest", csv_path, manifest_task="multiclass"), tmp_path / "raw")
    assert data.task == "multiclass" and data.classes == ["alpha", "mid", "zeta"]


def test_manifest_errors(tmp_path: Path) -> None:
    def build(rows, header=("path", "label"), **data):
        csv_path = write_manifest(tmp_path / str(len(list(tmp_path.iterdir()))), list(header), rows)
        return build_source(config("manifest", csv_path, **data), tmp_path / "raw")

    with pytest.raises(SourceError, match="column named label or labels"):
        build([["a.png", "x"]], header=("path", "diagnosis"))
    with pytest.raises(SourceError, match="column named path or image"):
        build([["a.png", "x"]], header=("file", "label"))
    with pytest.raises(SourceError, match="exactly 2 labels, found 3"):
        build([["a.png", "x"], ["b.png", "y"], ["c.png", "z"]])
    with pytest.raises(SourceError, match="exactly 2 labels, found 1"):
        build([["a.png", "normal"], ["b.png", "normal"]])
    with pytest.raises(SourceError, match="set data.positive_label"):
        build([["a.png", "cat"], ["b.png", "dog"]])
    with pytest.raises(SourceError, match="not one of the labels"):
        build([["a.png", "cat"], ["b.png", "dog"]], positive_label="bird")
    with pytest.raises(SourceError, match="empty label"):
        build([["a.png", "cat"], ["b.png", ""]], manifest_task="multiclass")
    with pytest.raises(SourceError, match="does not exist"):
        build_source(config("manifest", tmp_path / "none.csv"), tmp_path / "raw")
