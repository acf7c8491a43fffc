"""The adapter on BentoML's private form parser: it fails here, loudly, the day BentoML moves what it uses."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from _bentoml_impl import serde
from _bentoml_sdk.io_models import IODescriptor
from pydantic_core import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from cxr.serving import bentoml_forms


def predict(file: Path, label: str | None = None) -> dict:
    """An API shaped like the service's: one file field and one text field."""
    return {}


UPLOAD = IODescriptor.from_input(predict)


@pytest.fixture
def table(monkeypatch) -> dict:
    """BentoML's media-type table, restored after the test."""
    for media_type in bentoml_forms.MEDIA_TYPES:
        monkeypatch.setitem(serde.ALL_SERDE, media_type, serde.ALL_SERDE[media_type])
    return serde.ALL_SERDE


def request(**kwargs) -> Request:
    """A Starlette request carrying the multipart body httpx would send."""
    built = httpx.Request("POST", "http://127.0.0.1/predict", **kwargs)
    body = built.read()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    headers = [(k.lower().encode(), v.encode()) for k, v in built.headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/predict", "headers": headers}, receive)


def parse(req: Request):
    return asyncio.run(bentoml_forms.FormSerde().parse_request(req, UPLOAD))


def test_what_the_adapter_relies_on_is_still_there():
    """BentoML is pinned; a new version that renames or reshapes these breaks the adapter: update it then."""
    assert isinstance(serde.ALL_SERDE, dict), "BentoML's _bentoml_impl.serde.ALL_SERDE is no longer a dict"
    for media_type in bentoml_forms.MEDIA_TYPES:
        assert issubclass(serde.ALL_SERDE[media_type], serde.MultipartSerde), media_type
    assert asyncio.iscoroutinefunction(serde.MultipartSerde.parse_request)
    assert UPLOAD.multipart_fields == ["file"], "BentoML's IO models no longer list their file fields"


def test_installing_replaces_the_two_form_media_types_once_and_for_all(table):
    untouched = {m: table[m] for m in table if m not in bentoml_forms.MEDIA_TYPES}
    bentoml_forms.install()
    assert bentoml_forms.installed()
    assert {m: table[m] for m in bentoml_forms.MEDIA_TYPES} == dict.fromkeys(
        bentoml_forms.MEDIA_TYPES, bentoml_forms.FormSerde
    )
    bentoml_forms.install()  # a second worker start in the same process
    assert bentoml_forms.installed() and bentoml_forms.FormSerde.__mro__[1] is serde.MultipartSerde
    assert {m: table[m] for m in untouched} == untouched


def test_the_two_form_mistakes_are_validation_errors():
    mistakes = request(data={"file": "http://127.0.0.1:9/x.dcm"}, files={"other": ("x.dcm", b"1")})
    with pytest.raises(ValidationError) as err:
        parse(mistakes)
    text = str(err.value)
    assert "`file` must be a file upload (URLs and text are not fetched)" in text
    assert "unexpected file field `other`: this API takes `file`" in text


def test_a_good_form_goes_on_to_bentomls_own_parser(monkeypatch):
    seen = []

    async def bentoml_parser(self, req, cls):
        form = await req.form()  # cached by Starlette: the adapter's read did not consume the body
        seen.append((cls, form["label"], isinstance(form["file"], UploadFile)))
        return "parsed"

    monkeypatch.setattr(serde.MultipartSerde, "parse_request", bentoml_parser)
    assert parse(request(data={"label": "pneumonia"}, files={"file": ("x.dcm", b"DICM")})) == "parsed"
    assert seen == [(UPLOAD, "pneumonia", True)]


def test_importing_the_service_changes_nothing_in_bentoml():
    """The service module declares; the adapter is installed when the HTTP worker starts."""
    code = (
        "import cxr.serving.service as s; from _bentoml_impl import serde; "
        "assert serde.ALL_SERDE['multipart/form-data'] is serde.MultipartSerde, 'patched at import'; "
        "assert s.CxrService.inner.exit_status_hook.__bentoml_deployment_hook__"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
