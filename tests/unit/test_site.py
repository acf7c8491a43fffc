"""Site operating points: the calibration split, the registry tag, and the served model answering at a site."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from starlette.requests import Request

from cxr.config import Config
from cxr.evaluation.site import CalibrationError, parse_size, split_for_calibration
from cxr.serving.served import ServedModel
from cxr.tracking.registry import RegistryError, operating_points, save_operating_point
from cxr.tracking.uris import ModelRef


def external_table(n_patients: int = 60, films: int = 3, keys: bool = True) -> pd.DataFrame:
    """Patients with 1..films films each, a third of them positive."""
    rng = np.random.default_rng(0)
    rows = []
    for p in range(n_patients):
        for f in range(1 + p % films):
            rows.append(
                {
                    "label": "PNEUMONIA" if p % 3 == 0 else "NORMAL",
                    "patient_key": f"k{p}" if keys else None,
                    "sha256": f"{p}-{f}-{rng.integers(1e9)}",
                }
            )
    return pd.DataFrame(rows)


def test_the_split_keeps_patients_whole_stratified_and_seeded():
    table = external_table()
    split = split_for_calibration(table, 0.3, seed=1)
    cal = table[split.calibration]
    assert split.unit == "patient"
    assert not set(cal["patient_key"]) & set(table[~split.calibration]["patient_key"])  # no patient on both sides
    assert len(cal) == pytest.approx(0.3 * len(table), abs=3)
    for label in ("NORMAL", "PNEUMONIA"):  # each label in the same share
        share = (cal["label"] == label).sum() / (table["label"] == label).sum()
        assert share == pytest.approx(0.3, abs=0.06)
    assert split.n_groups == (cal["patient_key"].nunique(), 60 - cal["patient_key"].nunique())
    again = split_for_calibration(table, 0.3, seed=1)
    other = split_for_calibration(table, 0.3, seed=2)
    assert (again.calibration == split.calibration).all() and (other.calibration != split.calibration).any()
    by_count = split_for_calibration(table, 40, seed=1)
    assert abs(int(by_count.calibration.sum()) - 40) <= 3


def test_without_patient_keys_the_split_is_per_file_and_copies_stay_together():
    table = external_table(keys=False)
    table.loc[1, "sha256"] = table.loc[0, "sha256"]  # the same film twice
    split = split_for_calibration(table, 0.5, seed=0)
    assert split.unit == "file" and split.calibration[0] == split.calibration[1]
    assert sum(split.n_groups) == len(table) - 1


@pytest.mark.parametrize("text", ["0", "1.5", "-3", "abc", "0.0", "12.5"])
def test_a_calibration_size_is_a_count_or_a_fraction(text):
    with pytest.raises(CalibrationError, match="count of images"):
        parse_size(text)
    assert parse_size("0.25") == 0.25 and parse_size("200") == 200 and isinstance(parse_size("200"), int)


def test_save_site_stores_a_version_tag(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = Config().override(
        {"mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "mlflow.artifact_location": str(tmp_path / "a")}
    )
    (tmp_path / "m").mkdir()
    from cxr.tracking.runs import configure

    configure(cfg)
    client = mlflow.MlflowClient()
    client.create_registered_model("cxr")
    client.create_model_version("cxr", str(tmp_path / "m"))
    point = {"threshold": 0.61, "rule": {"method": "youden"}, "n_calibration": 200, "dataset_hash": "h", "created": "t"}
    key = save_operating_point(cfg, "cxr", "1", "hospital_b", point)
    version = client.get_model_version("cxr", "1")
    assert key == "operating_point.hospital_b" and json.loads(version.tags[key]) == point
    assert operating_points(version) == {"hospital_b": point}
    with pytest.raises(RegistryError, match="no version 9"):
        save_operating_point(cfg, "cxr", "9", "hospital_b", point)
    with pytest.raises(RegistryError, match="site name"):
        save_operating_point(cfg, "cxr", "1", "../b", point)


def test_an_unreadable_operating_point_tag_is_left_out():
    version = SimpleNamespace(
        version="1", tags={"operating_point.a": "not json", "operating_point.b": '{"threshold": 0.7}'}
    )
    assert operating_points(version) == {"b": {"threshold": 0.7}}


SITES = {"hospital_b": {"threshold": 0.9, "rule": {"method": "youden"}, "n_calibration": 50}}


@pytest.fixture
def served(tiny_predictor) -> ServedModel:
    return ServedModel(tiny_predictor(32), ModelRef("cxr", "3", "models:/cxr/3"), {}, SITES)


def film() -> bytes:
    import io

    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))).save(buf, format="PNG")
    return buf.getvalue()


def test_the_served_model_answers_at_a_site_only_when_asked(served):
    (plain,) = served.predict([film()])
    (at_site,) = served.predict([film()], site="hospital_b")
    assert "operating_point" not in plain and plain["threshold"] == served.predictor.threshold
    assert at_site["operating_point"] == "hospital_b" and at_site["threshold"] == 0.9
    assert at_site["probabilities"] == plain["probabilities"]
    p = at_site["probabilities"]["pneumonia"]
    assert at_site["positive"] == (p >= 0.9) and plain["positive"] == (p >= 0.5)
    assert served.metadata()["operating_points"] == SITES
    copy = ServedModel.without_weights(json.loads(json.dumps(served.card())))  # the HTTP process's copy
    assert copy.sites == SITES and copy.site_refusal("hospital_b") is None


def test_an_unknown_site_is_refused_naming_the_known_ones(served, tiny_predictor):
    refused = served.predict([film(), film()], site="hospital_x")
    assert refused[0] == refused[1] and refused[0]["status"] == 400
    assert "unknown site 'hospital_x'" in refused[0]["error"] and "known: hospital_b" in refused[0]["error"]
    bare = ServedModel(tiny_predictor(32), ModelRef("model", None, "/m"))
    assert "known: none" in bare.site_refusal("hospital_b")["error"]


def test_the_service_reads_the_site_from_the_query_or_a_header():
    pytest.importorskip("bentoml")
    from cxr.serving.http_answers import requested_site

    def ctx(query: str = "", headers: dict[str, str] | None = None):
        scope = {
            "type": "http",
            "query_string": query.encode(),
            "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        }
        return SimpleNamespace(request=Request(scope))

    assert requested_site(ctx()) is None
    assert requested_site(ctx("site=hospital_b")) == "hospital_b"
    assert requested_site(ctx(headers={"X-CXR-Site": "hospital_b"})) == "hospital_b"
    assert requested_site(ctx("site=a", {"X-CXR-Site": "a"})) == "a"
    assert requested_site(ctx("site=a", {"X-CXR-Site": "b"}))["status"] == 400


def test_a_folder_of_dicoms_gets_patient_keys_and_subgroups_from_the_headers(tmp_path):
    from cxr.data.sources.synthetic import Encoding, encode, make_dataset, render
    from cxr.evaluation.external_data import load_external_set
    from cxr.imaging import patient_key

    for i in range(4):
        rng = np.random.default_rng(i)
        ds = make_dataset(
            render(rng, i % 2, 0.6, 64), Encoding(), rng, patient_name="Doe^Jane", patient_id=f"MRN-{i // 2}"
        )
        ds.PatientSex, ds.ViewPosition = "MF"[i % 2], "PA"
        (tmp_path / ["NORMAL", "PNEUMONIA"][i % 2]).mkdir(exist_ok=True)
        (tmp_path / ["NORMAL", "PNEUMONIA"][i % 2] / f"{i}.dcm").write_bytes(encode(ds))
    table = load_external_set(Config(), tmp_path, "binary", tmp_path / "work").table.sort_values("file")
    assert table["patient_key"].tolist() == [patient_key(f"MRN-{i // 2}", "dicom") for i in (0, 2, 1, 3)]
    assert table["sex"].tolist() == ["M", "M", "F", "F"] and set(table["view"]) == {"PA"}
    assert "MRN" not in table.to_csv()  # hashed, never the id itself
