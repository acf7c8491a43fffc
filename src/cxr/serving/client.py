"""A client for the cxr service's HTTP API: model metadata and one prediction per image file.

Transient failures (connection errors, timeouts, HTTP 5xx, 429, 408) are retried with exponential
backoff (tenacity), honouring ``Retry-After``. Any other 4xx means the service refused the file (not an
image, too small, ...) and is never retried: sending it again would get the same answer.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from cxr.errors import UserError

RETRY_STATUS = {408, 429, 500, 502, 503, 504}
MAX_MESSAGE = 500  # characters of an error body kept in the report


class ServiceUnavailable(UserError):
    """No usable cxr service at the given URL."""


@dataclass
class Answer:
    """The outcome for one image: ``ok`` (response is the service's JSON), ``refused`` (4xx: the file is
    unusable) or ``failed`` (no answer after every retry: worth sending again later)."""

    status: Literal["ok", "refused", "failed"]
    response: dict[str, Any] | None = None
    http_status: int | None = None
    error: str | None = None
    attempts: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Transient(Exception):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}: {error_message(response)}")
        self.response = response


def error_message(response: httpx.Response) -> str:
    """The service's own explanation: a JSON error field, else the body text."""
    try:
        body = response.json()
    except ValueError:
        body = response.text
    if isinstance(body, dict):
        body = next((body[k] for k in ("error", "detail", "message") if body.get(k)), body)
    text = body if isinstance(body, str) else str(body)
    return text.strip()[:MAX_MESSAGE] or response.reason_phrase


def _retry_after(exc: BaseException) -> float | None:
    if not isinstance(exc, _Transient):
        return None
    value = exc.response.headers.get("retry-after")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    when = email.utils.parsedate_to_datetime(value)
    return max(0.0, when.timestamp() - time.time()) if when else None


class _Backoff(wait_exponential):
    """Exponential backoff, or the server's Retry-After when it sent one (capped at ``max``)."""

    def __call__(self, retry_state: Any) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        hint = _retry_after(exc) if exc else None
        return min(hint, self.max) if hint is not None else super().__call__(retry_state)


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, (_Transient, httpx.TransportError))


class ServiceClient:
    """Async client; use as ``async with ServiceClient(url) as client``."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 20.0,
        concurrency: int = 8,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.retries = retries
        self._wait = _Backoff(multiplier=backoff, max=max_backoff)
        self._client = httpx.AsyncClient(
            base_url=self.url,
            timeout=timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )

    async def __aenter__(self) -> "ServiceClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            stop=stop_after_attempt(self.retries + 1),
            wait=self._wait,
            retry=retry_if_exception(_transient),
            reraise=True,
        )

    async def _send(self, method: str, path: str, **kwargs: Any) -> tuple[httpx.Response, int]:
        """One request with retries; returns the final response and the number of attempts."""
        attempts = 0
        async for attempt in self._retrying():
            with attempt:
                attempts += 1
                response = await self._client.request(method, path, **kwargs)
                if response.status_code in RETRY_STATUS:
                    raise _Transient(response)
        return response, attempts

    async def metadata(self) -> dict[str, Any]:
        """The served model's info: one POST, the method of every BentoML API (CxrService.metadata)."""
        try:
            response, _ = await self._send("POST", "/metadata", json={})
        except (httpx.TransportError, _Transient) as exc:
            raise ServiceUnavailable(
                f"cannot reach the cxr service at {self.url} ({exc}); start it with `bentoml serve` "
                "or evaluate in-process with --model models:/NAME@champion"
            ) from None
        if response.status_code != 200:
            raise ServiceUnavailable(
                f"{self.url}/metadata answered HTTP {response.status_code} ({error_message(response)}); "
                "is this a cxr service?"
            )
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ServiceUnavailable(f"{self.url}/metadata did not return a JSON object; is this a cxr service?")
        return body

    async def predict(self, data: bytes, name: str) -> Answer:
        """POST one file to /predict (multipart field ``file``)."""
        try:
            response, attempts = await self._send("POST", "/predict", files={"file": (name, data)})
        except _Transient as exc:
            return Answer("failed", http_status=exc.response.status_code, error=str(exc), attempts=self.retries + 1)
        except httpx.TransportError as exc:
            return Answer("failed", error=f"{type(exc).__name__}: {exc}".rstrip(": "), attempts=self.retries + 1)
        if response.status_code in (404, 405):
            # every request would fail the same way: the URL is wrong, not the file
            raise ServiceUnavailable(f"{self.url}/predict answered HTTP {response.status_code}; is this a cxr service?")
        if 400 <= response.status_code < 500:
            return Answer("refused", http_status=response.status_code, error=error_message(response), attempts=attempts)
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200 or not isinstance(body, dict) or "probabilities" not in body:
            return Answer(
                "failed",
                http_status=response.status_code,
                error=f"unexpected answer: {error_message(response)}",
                attempts=attempts,
            )
        return Answer("ok", response=body, http_status=200, attempts=attempts)
