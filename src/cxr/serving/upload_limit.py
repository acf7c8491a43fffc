"""ASGI middleware that refuses an oversized or unsized upload before it is parsed."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from cxr.serving.http_answers import refused_upload
from cxr.serving.served import service_config


class UploadLimit:
    """ASGI middleware: refuse a POST body larger than imaging.max_bytes (413) before it is parsed,
    and a body of unknown length (411), so an upload can never fill the disk or memory."""

    OVERHEAD = 1 << 20  # room for the multipart framing and small form fields
    DRAIN = 64 << 20  # read (and drop) at most this much of a refused body so the client sees the answer

    def __init__(self, app: Any) -> None:
        self.app = app
        self._limit: int | None = None

    def limit(self) -> int:
        if self._limit is None:
            self._limit = service_config().imaging.max_bytes + self.OVERHEAD
        return self._limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is None and b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            return await JSONResponse({"error": "send the upload with a Content-Length header"}, status_code=411)(
                scope, receive, send
            )
        try:
            size = int(length or 0)
        except ValueError:
            return await JSONResponse({"error": "invalid Content-Length header"}, status_code=400)(scope, receive, send)
        if size > self.limit():
            await self._drain(receive, size)
            return await refused_upload(
                {
                    "error": f"request body of {size} bytes exceeds the upload limit of {self.limit()} bytes "
                    "(imaging.max_bytes plus form overhead)",
                    "status": 413,
                }
            )(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _drain(self, receive: Any, size: int) -> None:
        if size > self.DRAIN:
            return
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                return
