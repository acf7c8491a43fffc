"""The one adapter on BentoML's internals: its form parser answers client mistakes with 400, not 500.

BentoML 1.4's multipart parser (``_bentoml_impl.serde.MultipartSerde``, private) answers HTTP 500 to two
client mistakes: a text value in a file field (it tries to download it as a URL) and a file under an
unknown field name. ``install()`` puts a subclass in BentoML's media-type table (``ALL_SERDE``) that
checks the parsed form first (Starlette caches it, so nothing is parsed twice) and answers 400 like
any invalid input. It is installed by the HTTP service when its worker starts, never at import;
installing it again changes nothing. BentoML is pinned (pyproject.toml), and
tests/unit/test_bentoml_forms.py fails if what this relies on moves.
"""

from __future__ import annotations

from typing import Any

from _bentoml_impl import serde
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError
from starlette.datastructures import UploadFile

MEDIA_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


class FormSerde(serde.MultipartSerde):
    """BentoML's multipart parser, after a check that refuses the two mistakes as validation errors."""

    async def parse_request(self, request: Any, cls: Any) -> Any:
        form = await request.form()
        wanted = ", ".join(f"`{k}`" for k in cls.multipart_fields) or "no file"
        errors = []
        for key, value in form.multi_items():
            if key in cls.multipart_fields and not isinstance(value, UploadFile):
                errors.append((key, f"`{key}` must be a file upload (URLs and text are not fetched)"))
            elif key not in cls.multipart_fields and isinstance(value, UploadFile):
                errors.append((key, f"unexpected file field `{key}`: this API takes {wanted}"))
        if errors:
            raise ValidationError.from_exception_data(
                cls.__name__,
                [
                    InitErrorDetails(type=PydanticCustomError("upload", msg), loc=(key,), input=key)
                    for key, msg in errors
                ],
            )
        return await super().parse_request(request, cls)


def install() -> None:
    """Parse form uploads with FormSerde in this process (idempotent)."""
    for media_type in MEDIA_TYPES:
        serde.ALL_SERDE[media_type] = FormSerde  # type: ignore[index]


def installed() -> bool:
    return all(serde.ALL_SERDE.get(m) is FormSerde for m in MEDIA_TYPES)
