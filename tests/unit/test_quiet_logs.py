"""Client mistakes log one line; server errors keep their traceback (through BentoML's own log_exception)."""

from __future__ import annotations

import io
import logging
from http import HTTPStatus

import pytest
from bentoml._internal.server.http_app import log_exception
from bentoml.exceptions import BadInput, BentoMLException
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError
from starlette.requests import Request

from cxr.serving import quiet_logs


@pytest.fixture
def log(monkeypatch) -> io.StringIO:
    """Every record of BentoML's request logger, formatted with tracebacks as `bentoml serve` does, filter installed."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(quiet_logs.BENTOML_LOGGER)
    monkeypatch.setattr(logger, "filters", [])
    monkeypatch.setattr(logger, "handlers", [handler])
    monkeypatch.setattr(logger, "propagate", False)
    monkeypatch.setattr(logger, "disabled", False)
    assert not quiet_logs.installed()
    quiet_logs.install()
    quiet_logs.install()  # a second worker start in the same process
    assert quiet_logs.installed() and len(logger.filters) == 1
    return out


def bentoml_logs(exc: BaseException) -> None:
    """What BentoML's API wrapper does with an exception it answers."""
    request = Request({"type": "http", "method": "POST", "path": "/predict", "headers": []})
    try:
        raise exc
    except BaseException:
        log_exception(request)


def validation_error() -> ValidationError:
    detail = InitErrorDetails(
        type=PydanticCustomError("upload", "unexpected file field `image`"), loc=("image",), input="Doe^Jane"
    )
    return ValidationError.from_exception_data("Input", [detail])


@pytest.mark.parametrize(
    "exc,status,phrase",
    [
        (validation_error(), 400, "1 validation error for Input (image: unexpected file field `image`)"),
        (BadInput("no such label"), 400, "no such label"),
        (BentoMLException("pickle", error_code=HTTPStatus.UNSUPPORTED_MEDIA_TYPE), 415, "pickle"),
    ],
    ids=["validation error", "BadInput", "415"],
)
def test_a_client_error_is_one_info_line_without_the_input(log, exc, status, phrase):
    bentoml_logs(exc)
    text = log.getvalue()
    assert text == f"INFO client error {status} on /predict [POST]: {phrase}\n"
    assert "Doe^Jane" not in text


@pytest.mark.parametrize(
    "exc", [RuntimeError("boom"), BentoMLException("down", error_code=HTTPStatus.SERVICE_UNAVAILABLE)], ids=str
)
def test_a_server_error_keeps_its_traceback(log, exc):
    bentoml_logs(exc)
    text = log.getvalue()
    assert text.startswith("ERROR Exception on /predict [POST]\nTraceback") and str(exc) in text


def test_other_records_pass_untouched(log):
    logger = logging.getLogger(quiet_logs.BENTOML_LOGGER)
    logger.error("Exception on %s [%s]", "/x", "GET")  # no exception
    try:
        raise validation_error()
    except ValidationError:
        logger.exception("Task(%s) failed", "x")  # not log_exception's record
    text = log.getvalue()
    assert text.startswith("ERROR Exception on /x [GET]\nERROR Task(x) failed\nTraceback"), text
