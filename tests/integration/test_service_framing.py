"""Malformed requests to the real service: each is a 4xx with a JSON ``error``, never a 5xx, and logs one line.

Hand-built bodies (a form without a boundary, a body framed by another boundary, a part without a field name,
over 1,000 fields or files ...) go to /predict, /predict_batch and /explain of one `bentoml serve` of the tiny
model test_service.py trains; then the server's log must hold no traceback for them, and a good film is answered.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from test_service import film_png, project  # noqa: F401 (project: the module's trained and promoted model)

from support.reader_fuzz import rle_with_one_flipped_bit
from support.serve_process import ServiceProcess as Server

pytestmark = pytest.mark.slow

ENDPOINTS = {"/predict": "file", "/predict_batch": "files", "/explain": "file"}
FORM = "multipart/form-data; boundary=x"


def part(name: str, filename: str | None = None, data: bytes = b"v", boundary: bytes = b"x") -> bytes:
    """One multipart part, framed by ``boundary``."""
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return b"--%s\r\nContent-Disposition: %s\r\n\r\n%s\r\n" % (boundary, disposition.encode(), data)


def raw(body: bytes, content_type: str = FORM) -> dict:
    """httpx arguments that send ``body`` as it is, under ``content_type``."""
    return {"content": body, "headers": {"content-type": content_type}}


# name -> (httpx arguments given the API's file field, the status, a phrase of the `error`)
MALFORMED: dict[str, tuple[Callable[[str], dict], int, str]] = {
    "multipart without boundary": (
        lambda f: raw(part(f, "x.png") + b"--x--\r\n", "multipart/form-data"),
        400,
        "names no boundary",
    ),
    "body framed by another boundary": (
        lambda f: raw(part(f, "x.png", boundary=b"y") + b"--y--\r\n"),
        400,
        "does not follow the boundary",
    ),
    "body without any boundary": (lambda f: raw(b"just some text"), 400, "does not follow the boundary"),
    "part without Content-Disposition": (
        lambda f: raw(b"--x\r\nContent-Type: image/png\r\n\r\nv\r\n--x--\r\n"),
        400,
        "no Content-Disposition",
    ),
    "1001 fields": (
        lambda f: raw(b"".join(part(f"f{i}") for i in range(1001)) + b"--x--\r\n"),
        400,
        "Too many fields",
    ),
    "1001 files": (
        lambda f: raw(b"".join(part(f, f"{i}.png") for i in range(1001)) + b"--x--\r\n"),
        400,
        "Too many files",
    ),
    "1001 url-encoded fields": (
        lambda f: raw(b"&".join(b"f%d=v" % i for i in range(1001)), "application/x-www-form-urlencoded"),
        400,
        "Too many fields",
    ),
    "1.1 MB text field": (lambda f: raw(part("label", data=b"a" * 1_100_000)), 400, "exceeded maximum size"),
    "body cut before its end": (lambda f: raw(part(f, "x.png")[:-4]), 400, "Field required"),
    "no body": (lambda f: {"content": b""}, 400, "validation error"),
    "empty multipart body": (lambda f: raw(b""), 400, "Field required"),
    "multipart with no parts": (lambda f: raw(b"--x--\r\n"), 400, "Field required"),
    "raw bytes, no form": (lambda f: raw(b"\x89PNG garbage", "image/png"), 400, "validation error"),
    "url in the file field": (lambda f: {"data": {f: "http://127.0.0.1:9/x.dcm"}}, 400, "must be a file upload"),
    "wrong file field name": (lambda f: {"files": {"image": ("x.dcm", b"123")}}, 400, "unexpected file field"),
    "JSON, no file": (lambda f: {"json": {}}, 400, "validation error"),
}


@pytest.fixture(scope="module")
def server(project: Path, start_service) -> Server:  # noqa: F811 (the fixture imported above)
    return start_service(project, project / "framing.log")


@pytest.fixture
def new_log(server: Server) -> Iterator[Callable[[], str]]:
    """What the server logged since the test began (after a pause for its writes to land)."""
    start = len(server.text())

    def since() -> str:
        time.sleep(1)
        return server.text()[start:]

    yield since


def post(server: Server, path: str, case: str) -> httpx.Response:
    make, _, _ = MALFORMED[case]
    return httpx.post(f"{server.url}{path}", timeout=60, **make(ENDPOINTS[path]))


def good_film_is_answered(server: Server) -> None:
    ok = httpx.post(f"{server.url}/predict", files={"file": ("ok.png", film_png())}, timeout=60)
    assert ok.status_code == 200, ok.text[:500]


@pytest.mark.parametrize("path", ENDPOINTS)
def test_malformed_requests_are_4xx_with_a_json_error_then_the_service_answers(server: Server, path: str):
    wrong = []
    for case, (_, status, phrase) in MALFORMED.items():
        r = post(server, path, case)
        body = r.json() if r.headers.get("content-type") == "application/json" else None
        error = body.get("error") if isinstance(body, dict) else None
        if r.status_code != status or not isinstance(error, str) or phrase not in error:
            wrong.append(f"{case}: HTTP {r.status_code} {r.text[:300]}")
    assert wrong == []
    good_film_is_answered(server)


def cut_12bit_jpeg_chest() -> bytes:
    """pydicom's 12-bit JPEG (Extended) DICOM, relabelled a chest film, its JPEG stream cut to a third."""
    ds = pydicom.dcmread(get_testdata_file("JPGExtended.dcm"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 3]])
    ds.BodyPartExamined, ds.Modality = "CHEST", "DX"
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


# refused DICOMs (422) and a phrase of the refusal
REFUSED = {
    "12-bit JPEG DICOM, cut": (cut_12bit_jpeg_chest, "JPEG"),
    "RLE chest DICOM, one bit flipped": (rle_with_one_flipped_bit, "cannot decode DICOM pixel data"),
}


def test_client_mistakes_log_one_line_not_a_traceback(server: Server, new_log):
    """Before: BentoML logged every 400 at ERROR with a traceback (three chained for a broken form), and pydicom
    one per decoding plugin that failed on a refused DICOM."""
    sent = 0
    for path, field in ENDPOINTS.items():
        for case in ("multipart without boundary", "wrong file field name", "JSON, no file"):
            assert post(server, path, case).status_code == 400
            sent += 1
        for name, (make, phrase) in REFUSED.items():
            r = httpx.post(f"{server.url}{path}", files={field: ("x.dcm", make())}, timeout=60)
            assert r.status_code == 422 and phrase in r.json()["error"], f"{name} {path}: {r.text[:300]}"
    log = new_log()
    assert "Traceback" not in log and "[ERROR]" not in log, log[-5000:]
    said = [line for line in log.splitlines() if "client error 400 on /" in line]
    assert len(said) == sent and all("[INFO]" in line for line in said), log[-5000:]
    assert "names no boundary" in said[0] and "unexpected file field `image`" in said[1]
    good_film_is_answered(server)
