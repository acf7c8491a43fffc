"""Scoring the external set: through the service's HTTP API or in process, answers cached so a run resumes."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxr.errors import UserError
from cxr.evaluation.external.answering import IN_PROCESS, EvaluatedModel
from cxr.evaluation.external_data import ExternalSet
from cxr.evaluation.response_cache import ResponseCache, cache_key
from cxr.progress import progress_bar
from cxr.serving.client import Answer, ServiceClient

if TYPE_CHECKING:
    from cxr.serving.served import ServedModel as Served


@dataclass
class Scored:
    answers: list[Answer]  # one per row of the external table, in order
    sent: int
    cached: int


def _keys(ext: ExternalSet, endpoint: str, model: EvaluatedModel) -> list[str]:
    return [cache_key(h, endpoint, model.identity) for h in ext.table["sha256"]]


def _advance_fields(answers: list[Answer | None]) -> dict[str, int]:
    done = [a for a in answers if a is not None]
    return {"ok": sum(a.status == "ok" for a in done), "not ok": sum(a.status != "ok" for a in done)}


def score_remote(
    ext: ExternalSet, model: EvaluatedModel, cache: ResponseCache, client_kwargs: dict[str, Any], concurrency: int
) -> Scored:
    return asyncio.run(_score_remote(ext, model, cache, client_kwargs, concurrency))


async def _score_remote(
    ext: ExternalSet, model: EvaluatedModel, cache: ResponseCache, client_kwargs: dict[str, Any], concurrency: int
) -> Scored:
    async with ServiceClient(concurrency=concurrency, **client_kwargs) as client:
        keys = _keys(ext, f"{client.url}/predict", model)
        answers: list[Answer | None] = [cache.get(k) for k in keys]
        todo = [i for i, a in enumerate(answers) if a is None]
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int, advance: Any) -> None:
            row = ext.table.iloc[i]
            async with gate:
                data = await asyncio.to_thread(Path(row["image"]).read_bytes)
                answer = await client.predict(data, "upload" + Path(row["image"]).suffix.lower())
            answers[i] = check_same_model(answer, model)
            cache.put(keys[i], answers[i])
            advance(**_advance_fields(answers))

        with progress_bar(f"scoring {len(todo)} images via {client.url}", total=len(todo)) as advance:
            await asyncio.gather(*(one(i, advance) for i in todo))
    return Scored([a for a in answers if a is not None], sent=len(todo), cached=len(keys) - len(todo))


def check_same_model(answer: Answer, model: EvaluatedModel) -> Answer:
    """An answer from another model version (the champion moved mid-run) must not be mixed in."""
    if answer.status != "ok" or model.version is None:
        return answer
    served = (answer.response or {}).get("model", {}).get("version")
    if served is not None and str(served) != model.version:
        return Answer(
            "failed",
            http_status=answer.http_status,
            attempts=answer.attempts,
            error=f"answered by model version {served}, not {model.version} (the served model changed "
            "during the run); run again to score it with the current model",
        )
    return answer


def score_local(ext: ExternalSet, model: EvaluatedModel, served: "Served", cache: ResponseCache) -> Scored:
    """The service's own answer function (cxr.serving.served) on the same bytes: same answers, same refusals.

    One image per forward pass, as the service does for one request at a time: float32 results can
    differ in the last bit with the batch an image shares, and an image's score should not depend on
    its neighbours."""
    keys = _keys(ext, IN_PROCESS, model)
    answers: list[Answer | None] = [cache.get(k) for k in keys]
    todo = [i for i, a in enumerate(answers) if a is None]
    with progress_bar(f"scoring {len(todo)} images in-process", total=len(todo)) as advance:
        for i in todo:
            (result,) = served.predict([Path(ext.table["image"].iat[i]).read_bytes()])
            if "error" in result:
                answers[i] = Answer("refused", http_status=result.get("status"), error=result["error"])
            else:
                answers[i] = Answer("ok", response=result, http_status=200)
            cache.put(keys[i], answers[i])
            advance(**_advance_fields(answers))
    return Scored([a for a in answers if a is not None], sent=len(todo), cached=len(keys) - len(todo))


def probabilities(responses: list[dict[str, Any]], model: EvaluatedModel) -> np.ndarray:
    """(N,) positive-class probability (binary) or (N, K) per label, in the model's label order."""
    if model.task.binary:
        return np.array([r["probabilities"][model.labels[1]] for r in responses], dtype=float)
    return np.array([[r["probabilities"][lab] for lab in model.labels] for r in responses], dtype=float)


def row_scores(answers: list[Answer], model: EvaluatedModel) -> tuple[np.ndarray, np.ndarray]:
    """(scored mask, probabilities) per row of the table; rows without an answer hold NaN."""
    ok = np.array([a.status == "ok" for a in answers])
    if not ok.any():
        first = next((a.error for a in answers if a.error), "no answer")
        raise UserError(
            f"none of the {len(answers)} images was scored ({Counter(a.status for a in answers)}); first error: {first}"
        )
    probs = probabilities([a.response for a in answers if a.status == "ok"], model)
    full = np.full((len(answers), *probs.shape[1:]), np.nan)
    full[ok] = probs
    return ok, full
