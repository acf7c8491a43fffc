"""The one adapter on BentoML's internals: its form parser answers client mistakes with 400, not 500.

BentoML 1.4's multipart parser (``_bentoml_impl.serde.MultipartSerde``, private) answers HTTP 500 to
client mistakes: a text value in a file field (it tries to download it as a URL), a file under an
unknown field name, and a body Starlette cannot parse as a form (no boundary, a body that does not
follow its boundary, a part without a field name, over 1,000 fields or files: Starlette's own 400,
which BentoML wraps in a 500). ``install()`` puts a subclass in BentoML's media-type table
(``ALL_SERDE``) that parses and checks the form first (Starlette caches it, so nothing is parsed
twice) and answers 400 like any invalid input, with an ``error`` that says what is wrong (BentoML's
own says "1 validation error for Input" and leaves the reason to ``detail``). It is installed by the
HTTP service when its worker starts, never at import; installing it again changes nothing. BentoML is pinned (pyproject.toml), and
tests/unit/test_bentoml_forms.py fails if what this relies on moves.
"""

from __future__ import annotations

from typing import Any, NoReturn

from _bentoml_impl import serde
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

MEDIA_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
# Starlette's words for a form it cannot parse, where they do not say what the client should fix.
FRAMING_HINTS = {
    "Missing boundary in multipart.": "its Content-Type names no boundary (multipart/form-data; boundary=...)",
    "Invalid multipart data.": "it does not follow the boundary its Content-Type names",
    'The Content-Disposition header field "name" must be provided.': (
        "a part has no Content-Disposition header naming its form field"
    ),
}


class FormSerde(serde.MultipartSerde):
    """BentoML's multipart parser, after a check that refuses the form mistakes as validation errors."""

    async def parse_request(self, request: Any, cls: Any) -> Any:
        form = await read_form(request)
        mistakes = form_mistakes(form, cls)
        if mistakes:
            raise_form_error("the form: " + "; ".join(msg for _, _, msg in mistakes), mistakes)
        try:
            return await super().parse_request(request, cls)
        except ValidationError as exc:  # a missing field, a bad value: the error names it, not only its detail
            found = [(".".join(map(str, e["loc"])), e["type"], e["msg"]) for e in exc.errors()]
            raise_form_error("the form: " + "; ".join(f"`{f}`: {msg}" for f, _, msg in found), found)


def form_mistakes(form: Any, cls: Any) -> list[tuple[str, str, str]]:
    """(field, kind, message) of each text in a file field (BentoML would fetch it as a URL) and each file
    under a field the API does not take."""
    wanted = ", ".join(f"`{k}`" for k in cls.multipart_fields) or "no file"
    mistakes = []
    for key, value in form.multi_items():
        if key in cls.multipart_fields and not isinstance(value, UploadFile):
            mistakes.append((key, "upload", f"`{key}` must be a file upload (URLs and text are not fetched)"))
        elif key not in cls.multipart_fields and isinstance(value, UploadFile):
            mistakes.append((key, "upload", f"unexpected file field `{key}`: this API takes {wanted}"))
    return mistakes


async def read_form(request: Any) -> Any:
    """The parsed form, or a validation error (BentoML's 400) saying why the body is not one."""
    try:
        return await request.form()
    except (MultiPartException, HTTPException) as exc:  # HTTPException: Starlette's 400, raised inside an app
        if isinstance(exc, HTTPException) and exc.status_code >= 500:
            raise
        detail = exc.detail if isinstance(exc, HTTPException) else exc.message
    reason = FRAMING_HINTS.get(detail, detail.rstrip("."))
    raise_form_error(f"the form body: {reason}", [("body", "form", reason)])


def raise_form_error(title: str, errors: list[tuple[str, str, str]]) -> NoReturn:
    """Raise (field, kind, message) errors as one ValidationError, which BentoML answers 400 with
    ``{"error": "N validation error for TITLE", "detail": [...]}`` (its BadInput would be a JSON list):
    so the title says what is wrong. No input value is kept: it could quote an upload."""
    details = [InitErrorDetails(type=PydanticCustomError(kind, msg), loc=(f,), input=f) for f, kind, msg in errors]
    raise ValidationError.from_exception_data(title, details) from None


def install() -> None:
    """Parse form uploads with FormSerde in this process (idempotent)."""
    for media_type in MEDIA_TYPES:
        serde.ALL_SERDE[media_type] = FormSerde  # type: ignore[index]


def installed() -> bool:
    return all(serde.ALL_SERDE.get(m) is FormSerde for m in MEDIA_TYPES)
