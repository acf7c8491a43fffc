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


def raw_request(body: bytes, content_type: str, in_app: bool) -> Request:
    """A request with a hand-built body; inside an app Starlette raises its 400, outside its parse error."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": headers}
    return Request({**scope, "app": object()} if in_app else scope, receive)


def parse(req: Request):
    return asyncio.run(bentoml_forms.FormSerde().parse_request(req, UPLOAD))


def part(name: str, filename: str | None = None, boundary: bytes = b"x") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return b"--%s\r\nContent-Disposition: %s\r\n\r\nv\r\n" % (boundary, disposition.encode())


FRAMING = {
    "no boundary": (part("file", "a") + b"--x--\r\n", "multipart/form-data", "names no boundary"),
    "another boundary": (part("file", "a", b"y") + b"--y--\r\n", "multipart/form-data; boundary=x", "does not follow"),
    "no disposition": (
        b"--x\r\nContent-Type: text/plain\r\n\r\nv\r\n--x--\r\n",
        "multipart/form-data; boundary=x",
        "no Content-Disposition",
    ),
    "1001 fields": (
        b"".join(part(f"f{i}") for i in range(1001)) + b"--x--\r\n",
        "multipart/form-data; boundary=x",
        "Too many fields",
    ),
    "1001 files": (
        b"".join(part("file", f"{i}") for i in range(1001)) + b"--x--\r\n",
        "multipart/form-data; boundary=x",
        "Too many files",
    ),
    "1001 urlencoded fields": (
        b"&".join(b"f%d=v" % i for i in range(1001)),
        "application/x-www-form-urlencoded",
        "Too many fields",
    ),
}


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
    assert err.value.title == (
        "the form: `file` must be a file upload (URLs and text are not fetched); "
        "unexpected file field `other`: this API takes `file`"
    )
    assert "http://" not in str(err.value)  # no input value is quoted


@pytest.mark.parametrize("in_app", [True, False], ids=["in an app", "bare"])
@pytest.mark.parametrize("case", FRAMING, ids=list(FRAMING))
def test_a_body_that_is_not_a_form_is_a_validation_error_saying_why(case, in_app):
    body, content_type, phrase = FRAMING[case]
    with pytest.raises(ValidationError) as err:
        parse(raw_request(body, content_type, in_app))
    assert phrase in err.value.title and err.value.title.startswith("the form body: ")  # BentoML's `error` quotes it
    assert err.value.__cause__ is None and err.value.__suppress_context__  # one exception, not three chained


def test_the_error_of_a_form_without_its_file_names_the_field():
    with pytest.raises(ValidationError) as err:
        parse(request(data={"label": "pneumonia"}))
    assert err.value.title == "the form: `file`: Field required"
    assert err.value.errors(include_url=False) == [
        {"type": "missing", "loc": ("file",), "msg": "Field required", "input": "file"}
    ]


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
