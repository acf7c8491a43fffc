"""External evaluation pieces: answer cache, label mapping, folder layout, service errors, comparison."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json

import httpx
import numpy as np
import pandas as pd
import pytest

from cxr.config import Config
from cxr.data.sources.base import SourceError
from cxr.evaluation.external import (
    LOCAL_NAMES_NOTE,
    MLFLOW_NAMES_NOTE,
    EvaluatedModel,
    FileIds,
    compare,
    external_run_name,
    without_file_names,
)
from cxr.evaluation.external.scoring import check_same_model
from cxr.evaluation.external_data import folder_table, load_external_set, map_labels, targets
from cxr.evaluation.response_cache import ResponseCache, cache_key
from cxr.serving.client import Answer, ServiceClient, ServiceUnavailable


def test_cache_keeps_final_answers_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "responses.jsonl"
    cache = ResponseCache(path)
    ok = Answer("ok", response={"probabilities": {"normal": 0.25, "pneumonia": 0.75}}, http_status=200)
    cache.put("a", ok)
    cache.put("b", Answer("refused", http_status=400, error="not an image"))
    cache.put("c", Answer("failed", error="ConnectError"))  # worth another try: not kept
    with open(path, "a") as fh:
        fh.write('{"key": "d", "answer": {"status": "o')  # the process was killed mid-write
    again = ResponseCache(path)
    assert len(again) == 2 and again.get("a") == ok and again.get("b").status == "refused" and again.get("c") is None
    again.put("e", ok)  # appended after the torn line, on its own line
    assert ResponseCache(path).get("e") == ok


def test_cache_key_changes_with_endpoint_and_model_version():
    keys = {
        cache_key("h", "http://a/predict", "cxr/1"),
        cache_key("h", "http://b/predict", "cxr/1"),
        cache_key("h", "http://a/predict", "cxr/2"),
        cache_key("g", "http://a/predict", "cxr/1"),
    }
    assert len(keys) == 4


def test_labels_map_onto_the_model_labels():
    assert map_labels(["NORMAL", "PNEUMONIA"], ["normal", "pneumonia"], "binary") == {
        "NORMAL": "normal",
        "PNEUMONIA": "pneumonia",
    }
    assert map_labels(["0", "1"], ["no_finding", "finding"], "binary") == {"0": "no_finding", "1": "finding"}
    y = targets(pd.Series(["Effusion|mass", "", "MASS"]), ["Effusion", "Mass"], "multilabel")
    np.testing.assert_array_equal(y, [[1, 1], [0, 0], [0, 1]])
    with pytest.raises(SourceError, match="COVID"):
        map_labels(["COVID", "normal"], ["normal", "pneumonia"], "binary")
    with pytest.raises(SourceError, match="ambiguously"):
        map_labels(["normal", "healthy", "pneumonia"], ["normal", "pneumonia"], "binary")


def test_folder_labels_skip_split_folders(tmp_path):
    for rel in ("chest_xray/test/NORMAL/a.png", "chest_xray/test/PNEUMONIA/sub/b.jpeg", "val/NORMAL/c.dcm"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    table = folder_table(tmp_path)
    assert sorted(table["label"]) == ["NORMAL", "NORMAL", "PNEUMONIA"]
    (tmp_path / "loose.png").write_bytes(b"x")
    with pytest.raises(SourceError, match="label folder"):
        folder_table(tmp_path)


def _client(handler, **kw) -> ServiceClient:
    return ServiceClient("http://svc", transport=httpx.MockTransport(handler), backoff=0, **kw)


def test_refusal_keeps_the_service_message_and_is_not_retried():
    calls = []

    def handler(request):
        calls.append(request)
        return httpx.Response(422, json={"error": "upload: empty file"})

    async def go():
        async with _client(handler) as client:
            return await client.predict(b"", "x.dcm")

    answer = asyncio.run(go())
    assert (answer.status, answer.http_status, answer.error, len(calls)) == ("refused", 422, "upload: empty file", 1)


def test_transient_errors_exhaust_retries_into_a_failed_answer():
    calls = []

    def handler(request):
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectError("refused")
        return httpx.Response(503, text="warming up", headers={"Retry-After": "0"})

    async def go():
        async with _client(handler, retries=2) as client:
            return await client.predict(b"x", "x.png")

    answer = asyncio.run(go())
    assert answer.status == "failed" and answer.http_status == 503 and "warming up" in answer.error
    assert len(calls) == 3


def test_metadata_is_one_post_and_a_wrong_url_is_a_clear_error():
    sent = []

    def handler(request):
        sent.append((request.method, request.url.path))
        if request.url.path == "/metadata":
            if request.method != "POST":  # as BentoML answers any API called with another method
                return httpx.Response(405)
            return httpx.Response(200, json={"task": "binary", "labels": ["normal", "pneumonia"]})
        return httpx.Response(404)

    async def go():
        async with _client(handler) as client:
            meta = await client.metadata()
            with pytest.raises(ServiceUnavailable, match="404"):
                await client.predict(b"x", "x.png")
            return meta

    assert asyncio.run(go())["labels"] == ["normal", "pneumonia"]
    assert sent == [("POST", "/metadata"), ("POST", "/predict")]  # no GET probe that can only get 405


def test_comparison_reports_drop_and_ci_overlap():
    internal = {"auroc": {"value": 0.95, "ci_low": 0.92, "ci_high": 0.97}, "ece": {"value": 0.02}}
    external = {
        "auroc": {"value": 0.80, "ci_low": 0.74, "ci_high": 0.86},
        "ece": {"value": 0.10, "ci_low": 0.05, "ci_high": 0.15},
    }
    out = compare(internal, external)
    assert out["auroc"]["drop"] == pytest.approx(0.15) and out["auroc"]["cis_overlap"] is False
    assert out["auroc"]["notably_worse"] and out["ece"]["notably_worse"]  # a higher calibration error is worse
    assert out["ece"]["cis_overlap"] is None  # no internal CI to compare with


def test_an_answer_from_another_model_version_is_not_a_result():
    model = EvaluatedModel.from_metadata(
        {
            "task": "binary",
            "labels": ["normal", "pneumonia"],
            "threshold": 0.5,
            "model": {"name": "cxr", "version": "3", "uri": "models:/cxr@champion"},
        }
    )
    answer = Answer("ok", response={"probabilities": {}, "model": {"name": "cxr", "version": "4"}})
    checked = check_same_model(answer, model)
    assert checked.status == "failed" and "version 4, not 3" in checked.error
    same = Answer("ok", response={"probabilities": {}, "model": {"name": "cxr", "version": "3"}})
    assert check_same_model(same, model) is same
    assert model.identity == "cxr/3"  # the cache key part: a new version never reuses old answers


def test_external_runs_are_named_after_the_data_and_the_served_version(tmp_path):
    for rel in ("chest_xray/test/NORMAL/a.png", "chest_xray/test/PNEUMONIA/b.png", "mine/NORMAL/c.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(rel.encode())
    kaggle = load_external_set(Config(), tmp_path / "chest_xray" / "test", "binary", tmp_path / "work")
    mine = load_external_set(Config(), tmp_path / "mine", "binary", tmp_path / "work")
    served = EvaluatedModel("binary", ["NORMAL", "PNEUMONIA"], 0.5, name="cxr", version="3")
    assert external_run_name(kaggle, served) == "external chest_xray/test: cxr v3"  # a split folder says whose
    assert external_run_name(mine, EvaluatedModel("binary", ["NORMAL", "PNEUMONIA"], 0.5)) == "external mine: model"


def test_file_ids_are_salted_per_report_and_cannot_be_checked_against_a_name():
    ids, other = FileIds(), FileIds()
    name = "PNEUMONIA/Doe_Jane_19700101.dcm"
    assert ids(name) == ids(name) != ids("PNEUMONIA/Roe_Richard.dcm")  # one id per file within a report
    assert ids(name) != other(name)  # another report, another salt: no link across runs
    unsalted = {hashlib.sha256(name.encode()).hexdigest(), hmac.new(b"", name.encode(), hashlib.sha256).hexdigest()}
    assert not any(h.startswith(ids(name)) for h in unsalted)
    assert "salt" not in repr(ids) and len(ids(name)) == 20


def test_what_mlflow_gets_has_ids_where_the_report_has_names():
    ids = FileIds()
    report = {
        "data": {"notes": ["3 rows dropped", LOCAL_NAMES_NOTE]},
        "failures": [{"file": "NORMAL/Doe_Jane.png", "error": "upload: not a DICOM, PNG or JPEG file"}],
    }
    predictions = pd.DataFrame({"file": ["NORMAL/Doe_Jane.png"], "file_id": [ids("NORMAL/Doe_Jane.png")], "p": [0.5]})
    shared, rows = without_file_names(report, predictions, ids)
    assert shared["failures"] == [
        {"file": ids("NORMAL/Doe_Jane.png"), "error": "upload: not a DICOM, PNG or JPEG file"}
    ]
    assert shared["data"]["notes"] == ["3 rows dropped", MLFLOW_NAMES_NOTE]
    assert list(rows) == ["file_id", "p"] and "Doe_Jane" not in json.dumps(shared) + rows.to_csv()
    assert report["failures"][0]["file"] == "NORMAL/Doe_Jane.png"  # the local report is left as it was
