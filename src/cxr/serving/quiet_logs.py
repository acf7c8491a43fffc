"""Client mistakes log one line, not a traceback; server errors keep theirs.

BentoML's ``log_exception`` (``bentoml._internal.server.http_app``, private; BentoML is pinned) logs
"Exception on PATH [METHOD]" at ERROR with a traceback for every exception its API wrapper answers, the
validation errors it answers 400 (a malformed form, a missing field, a wrong field name) included: the
`bentoml serve` output cried wolf at each client mistake. ``install()`` puts a filter on that logger in
this process: the record of an exception BentoML answers with a 4xx becomes one INFO line naming the
status, the path and the reason (field locations and messages, never the input values, which may quote
an upload). Every other record passes untouched, so a 5xx still logs its traceback. Installing it again
changes nothing. (pydicom's tracebacks for each decoding plugin that fails are cxr.imaging's to quiet,
where it decodes.)
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from bentoml.exceptions import BentoMLException
from pydantic import ValidationError

BENTOML_LOGGER = "bentoml._internal.server.http_app"  # where BentoML's log_exception writes
BENTOML_PREFIX = "Exception on "  # log_exception's message: "Exception on %s [%s]"


def client_status(exc: BaseException | None) -> int | None:
    """The 4xx BentoML's API wrapper answers to ``exc``, or None when it answers 5xx (or it is no exception)."""
    if isinstance(exc, ValidationError):
        return HTTPStatus.BAD_REQUEST
    if isinstance(exc, BentoMLException) and int(exc.error_code) < 500:
        return int(exc.error_code)
    return None


def reason(exc: BaseException) -> str:
    """What was wrong, on one line; a validation error's input values are left out (they may quote an upload)."""
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        unsaid = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors if e["msg"] not in exc.title]
        said = f"{exc.error_count()} validation error for {exc.title}" + (f" ({'; '.join(unsaid)})" if unsaid else "")
    else:
        said = str(exc)
    return " ".join(said.split())


class ClientErrorsInOneLine(logging.Filter):
    """On BentoML's request logger: a 4xx answer's exception record becomes one INFO line, in place."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        status = client_status(exc)
        if exc is None or status is None or not str(record.msg).startswith(BENTOML_PREFIX):
            return True
        where = str(record.msg)[len(BENTOML_PREFIX) :] % (record.args or ())
        record.msg, record.args = f"client error {status} on {where}: {reason(exc)}", None
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info = record.exc_text = record.stack_info = None
        return True


def install() -> None:
    """Add the filter to BentoML's request logger in this process (idempotent)."""
    if not installed():
        logging.getLogger(BENTOML_LOGGER).addFilter(ClientErrorsInOneLine())


def installed() -> bool:
    return any(isinstance(f, ClientErrorsInOneLine) for f in logging.getLogger(BENTOML_LOGGER).filters)
