"""The service's answers that are not a prediction: refusals as HTTP errors, not ready, the site asked for."""

from __future__ import annotations

from typing import Any

import bentoml
from starlette.responses import JSONResponse

from cxr.serving.monitoring import monitor
from cxr.serving.served import is_refusal


def refused_response(result: dict[str, Any], ctx: bentoml.Context | None = None) -> JSONResponse:
    """The refusal as an HTTP error. An API taking ``ctx`` gets BentoML's ``ctx.response`` status on whatever
    it returns, so the status is set there too."""
    status = result.get("status", 422)
    if ctx is not None:
        ctx.response.status_code = status
    return JSONResponse({"error": result["error"]}, status_code=status)


SITE_PARAM, SITE_HEADER = "site", "x-cxr-site"


def requested_site(ctx: bentoml.Context) -> str | dict[str, Any] | None:
    """The operating point asked for: ``?site=NAME`` or the ``X-CXR-Site: NAME`` header (None: the model's
    own threshold); a refusal when the two name different sites, or for a query parameter the API does not take."""
    unknown = unknown_query(ctx, {SITE_PARAM})
    if unknown is not None:
        return unknown
    query, header = ctx.request.query_params.get(SITE_PARAM), ctx.request.headers.get(SITE_HEADER)
    if query and header and query != header:
        return {"error": f"?site={query} and X-CXR-Site: {header} disagree; give one", "status": 400}
    return query or header or None


def unknown_query(ctx: bentoml.Context, known: set[str]) -> dict[str, Any] | None:
    """A refusal naming query parameters the API does not read (a typo must not be silently ignored), else None."""
    unknown = sorted(set(ctx.request.query_params) - known)
    if not unknown:
        return None
    takes = ", ".join(f"?{k}=" for k in sorted(known)) or "none"
    return {"error": f"unknown query parameter {', '.join(unknown)}; this API takes {takes}", "status": 400}


def refused_upload(result: dict[str, Any], ctx: bentoml.Context | None = None) -> JSONResponse:
    """An upload refused: counted by reason on /metrics, then answered as ``refused_response`` does."""
    monitor().refused(result["error"])
    return refused_response(result, ctx)


def batch_refusal(results: list[Any]) -> dict[str, Any] | None:
    """One refusal naming each refused file by its position (the highest status), or None when none was."""
    refused = [(i, r) for i, r in enumerate(results) if is_refusal(r)]
    if not refused:
        return None
    message = "; ".join(f"file {i + 1} of {len(results)}: {r['error']}" for i, r in refused)
    return {"error": message, "status": max(r["status"] for _, r in refused)}


def not_ready(error: str, retry_after: int = 5) -> JSONResponse:
    return JSONResponse({"ready": False, "error": error}, status_code=503, headers={"Retry-After": str(retry_after)})
