"""BentoML service: HTTP around cxr.serving.ServedModel (the Predictor that evaluation uses).

    bentoml serve                      # from the repo root (bentofile.yaml: cxr.serving.service:CxrService)

Two BentoML services, each in its own worker process:

* ``cxr`` (CxrService, the HTTP entry point): APIs ``predict``, ``predict_batch``, ``explain``,
  ``metadata``, ``healthz``, ``readyz``. It checks the upload size, decodes and preprocesses
  uploads (threads, in parallel with the forward passes) with a weightless copy of the served
  model built from ``cxr_model``'s own card, so the two always agree on version, labels and
  threshold, and maps refusals to HTTP 4xx.
* ``cxr_model`` (CxrModel, reached through ``bentoml.depends``): holds the model; only uint8
  model inputs cross to it. With batching on, its ``infer`` is a batchable API and BentoML's
  adaptive batcher merges concurrent requests into one forward pass (the batcher only sits in
  front of calls that cross a service boundary, hence the second service). The topology is the
  same with batching off, so a built bento can be served either way.

Importing this module declares the two services and nothing else: the form-parser adapter
(cxr.serving.bentoml_forms) is installed when the HTTP worker starts, and the exit-status hook
when `bentoml serve` deploys the services.

Environment (read when the module is imported, i.e. at `bentoml serve` start):

* ``CXR_DEVICE`` (cpu): where the model runs (``cuda``, ``cuda:1``);
* ``CXR_BATCHING`` (on): BentoML's adaptive batcher merges concurrent ``predict`` requests into one
  forward pass. Measured with benchmarks/serving.py on 2 CPU cores (resnet18, 224 px PNG): 1.5x the
  requests/s at concurrency 32 in fp32, 2.2x in bf16, and the same p50 at concurrency 1;
* ``CXR_MAX_BATCH_SIZE`` (8 on CPU, 32 on a GPU): a CPU forward pass costs less per image up to
  batch ~8 and more beyond (cache), a GPU's keeps falling. ``CXR_MAX_LATENCY_MS`` (5000): BentoML
  answers 503 to a request it predicts cannot be served within it, so this is a shedding threshold
  under overload, not the batching window (which adapts to the traffic). It also seeds the
  batcher's cost model: the first few requests after start-up wait up to about half of it;
* ``CXR_HTTP_WORKERS`` (1): processes of the ``cxr`` service, each decoding uploads in up to one thread
  per core; the model stays one process (``cxr_model``, workers=1, threads=1: one forward pass at a
  time, so the batcher sees every request). More help only when decoding is the bottleneck (large
  DICOMs on many cores). /metrics sums every process's values (cxr.serving.monitoring);
* ``CXR_TORCH_THREADS`` (the cores this process may use): intra-op threads of the forward pass. On
  a machine shared with other CPU-heavy work set 1: OpenMP threads that have to wait for busy cores
  wait for each other (measured: a 64 px forward took 850 ms with 2 threads on a loaded 2-core box,
  5 ms with 1);
* ``CXR_PRECISION`` (fp32): ``bf16`` runs the forward pass under bfloat16 autocast. On a CPU with AMX
  (Intel Xeon 4th gen and later; ``amx_bf16`` in /proc/cpuinfo) or a GPU it is several times faster and
  batching then pays much more (measured on 2 Xeon cores, resnet18 224 px bare forward: fp32 60 / 72
  images/s at batch 1 / 8, bf16 96 / 190-250). Probabilities move by up to ~1e-2 from the fp32 ones that
  evaluation reported, so a film near the threshold can change side; ``metadata`` says which is served.
  On a CPU without native bf16 it is slower: leave it off;
* ``CXR_RUNTIME`` (torch): ``onnx`` runs the model's model.onnx (``cxr export``; ``cxr register`` logs one with
  each version) in onnxruntime, on the CPU in fp32, with CXR_TORCH_THREADS threads: the same answers (probabilities
  within 1e-4, OOD scores within 1e-3 relative, checked at export); Grad-CAM still runs in torch. ``auto`` serves
  onnx where it can (CPU, fp32, a recorded graph), else torch. On 2 idle Xeon cores (benchmarks/serving.py
  --runtime) onnx served 1.02-1.42x torch's requests/s. The default stays torch so that answers equal, to the last
  float, what `cxr evaluate` and `cxr evaluate-external --model` compute in process;
* ``CXR_MODEL_URI``, ``CXR_PARAMS``, ``MLFLOW_TRACKING_URI``: what to serve (see cxr.serving.served).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import anyio
import bentoml
import torch
from bentoml.validators import ContentType
from starlette.responses import Response

from cxr.errors import UserError
from cxr.serving import bentoml_forms, quiet_logs
from cxr.serving.http_answers import (
    batch_refusal,
    not_ready,
    refused_response,
    refused_upload,
    requested_site,
    unknown_query,
)
from cxr.serving.lifecycle import stop_server, watch_for_cannot_start
from cxr.serving.monitoring import monitor
from cxr.serving.served import ServedModel, is_refusal
from cxr.serving.upload_limit import UploadLimit

log = logging.getLogger(__name__)


def _flag(name: str, default: bool) -> bool:
    return os.environ.get(name, "1" if default else "0").strip().lower() not in ("0", "false", "no", "off", "")


# Module constants: the decorators below are configured from them, so they are part of the declaration.
DEVICE = os.environ.get("CXR_DEVICE", "cpu")
BATCHING = _flag("CXR_BATCHING", True)
MAX_BATCH_SIZE = int(os.environ.get("CXR_MAX_BATCH_SIZE", "32" if DEVICE.startswith("cuda") else "8"))
MAX_LATENCY_MS = int(os.environ.get("CXR_MAX_LATENCY_MS", "5000"))
HTTP_WORKERS = int(os.environ.get("CXR_HTTP_WORKERS", "1"))
TORCH_THREADS = int(os.environ.get("CXR_TORCH_THREADS", str(len(os.sched_getaffinity(0)))))
PRECISION = os.environ.get("CXR_PRECISION", "fp32").strip().lower()
RUNTIME = os.environ.get("CXR_RUNTIME", "torch").strip().lower()
MAX_FILES = 64  # files per predict_batch request
TIMEOUT_S = 120
INTERNAL_RETRIES = 3
READY_WITHIN_S = 2.0  # readiness answers within this, whatever the model service is doing
SATURATED_AFTER_S = 10.0  # every decoder busy with one upload this long: not ready (503 + Retry-After)


@bentoml.service(name="cxr_model", workers=1, threads=1, traffic={"timeout": TIMEOUT_S})
class CxrModel:
    """The loaded model, in its own worker process; reached by CxrService only."""

    def __init__(self) -> None:
        logging.getLogger("cxr").setLevel(logging.INFO)  # BentoML leaves the root logger at WARNING
        # One forward pass at a time (threads=1 above), so intra-op threads are what uses the cores.
        torch.set_num_threads(TORCH_THREADS)
        try:
            self.served = ServedModel.load(device=DEVICE, precision=PRECISION, runtime=RUNTIME)
        except UserError as exc:  # NoModelToServe (missing, corrupted, broken weights), a bad CXR_PRECISION or _RUNTIME
            stop_server(str(exc))
            raise
        except Exception as exc:  # anything else at load is as fatal: one line, not a restart loop
            stop_server(f"the model could not be loaded ({type(exc).__name__}: {str(exc).strip()[:200]})")
            raise

    @(
        bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
        if BATCHING
        else bentoml.api
    )
    def infer(self, inputs: list[Any]) -> list[Any]:
        """(preprocessed uint8 image, tabular or None) pairs -> probability, out-of-distribution score and spread
        of each (ServedModel.infer); concurrent calls merged by BentoML's adaptive batcher when CXR_BATCHING is on."""
        return self.served.infer(inputs)

    @bentoml.api
    def explain_upload(self, upload: bytes, label: str | None = None) -> dict[str, Any]:
        return self.served.explain(upload, label)

    @bentoml.api
    def card(self) -> dict[str, Any]:
        return self.served.card()


@bentoml.service(name="cxr", workers=HTTP_WORKERS, traffic={"timeout": TIMEOUT_S})
class CxrService:
    """Chest X-ray classification. Upload a DICOM, PNG or JPEG chest film as multipart field `file`."""

    model = bentoml.depends(CxrModel)

    @bentoml.on_deployment
    def exit_status_hook() -> None:
        """Runs once in `bentoml serve` itself, before any worker starts: the process whose exit status
        supervisors read, and the one a worker that cannot load the model stops (see stop_server)."""
        watch_for_cannot_start()

    def __init__(self) -> None:
        logging.getLogger("cxr").setLevel(logging.INFO)  # BentoML leaves the root logger at WARNING
        bentoml_forms.install()  # client mistakes in a form upload answer 400, not 500
        quiet_logs.install()  # client mistakes log one line, server errors their traceback
        self._served = None  # a weightless copy of the served model, built from the model service's card
        # Uploads are decoded here, in threads, while the model process runs forward passes.
        self._decoders = anyio.CapacityLimiter(os.cpu_count() or 1)
        self._decoding_since: dict[int, float] = {}  # decode id -> when it took its decoder (readiness reads it)

    def _client(self) -> Any:
        """The async client of the model service, told never to replace its HTTP session.

        BentoML 1.4's inter-service client replaces its session every 100 requests (or 5 minutes) and
        closes the old one under requests still in flight (bentoml/BentoML#5544, #4971): they fail, or
        (measured: 1 in ~2000 at concurrency 16) wait for their response until the 120 s timeout. The
        model service is on a local socket, so there is nothing to refresh."""
        client = self.model.to_async
        manager = getattr(client, "_session_manager", None)  # private: BentoML is pinned (pyproject.toml)
        if manager is not None:
            manager.max_requests, manager.max_age = 2**62, float("inf")
        return client

    async def _remote(self, name: str, *args: Any) -> Any:
        # Every call here is a pure function of its input, so a call that lost its connection anyway
        # (a restarted model worker) is simply sent again.
        for attempt in range(INTERNAL_RETRIES + 1):
            try:
                return await getattr(self._client(), name)(*args)
            except (aiohttp.ClientConnectionError, RuntimeError) as exc:
                if attempt == INTERNAL_RETRIES or (isinstance(exc, RuntimeError) and "closed" not in str(exc)):
                    raise
                log.info("retrying %s after a dropped internal connection (%s)", name, type(exc).__name__)

    async def _model(self) -> Any:
        """The weightless ServedModel that prepares inputs and words answers here."""
        if self._served is None:
            self._served = ServedModel.without_weights(await self._remote("card"))
        return self._served

    async def _prepare(self, files: list[Path]) -> list[Any]:
        served = await self._model()

        async def one(path: Path) -> Any:
            data = await anyio.Path(path).read_bytes()
            async with self._decoders:
                self._decoding_since[id(data)] = time.monotonic()
                try:
                    return await anyio.to_thread.run_sync(served.prepare, data)
                finally:
                    del self._decoding_since[id(data)]

        return list(await asyncio.gather(*(one(f) for f in files)))

    async def _infer(self, prepared: list[Any]) -> list[Any]:
        return await self._remote("infer", [(p.x, p.tabular) for p in prepared])

    @bentoml.api
    async def predict(self, file: Path, ctx: bentoml.Context, abstain: bool = True) -> dict[str, Any]:
        """Probabilities per label, the decision at the model's threshold, the model version and warnings.
        `ood` says whether the film is like the training films; one that is not gets the decision `abstain`
        and `abstain_reason`, unless the form field `abstain` is false (then the decision is given anyway,
        still marked out of distribution). With `?site=NAME` (or header `X-CXR-Site: NAME`) the decision is at
        that site's stored operating point, and `operating_point` names it; an unknown site is refused (400)."""

        site = await self._site(ctx)
        if is_refusal(site):
            return refused_response(site, ctx)
        (prepared,) = await self._prepare([file])
        if is_refusal(prepared):
            return refused_upload(prepared, ctx)
        (scored,) = await self._infer([prepared])
        answer = self._answer(prepared, scored, site, abstain)
        return refused_response(answer, ctx) if is_refusal(answer) else answer

    def _answer(self, prepared: Any, scored: Any, site: str | None, abstain: bool) -> dict[str, Any]:
        answer = self._served.answer(prepared, scored, site, abstain)
        if not is_refusal(answer):  # a model that gave NaN: logged by ServedModel, answered 503
            monitor().answered(self._served, prepared, answer)
        return answer

    @bentoml.api
    async def predict_batch(
        self, files: list[Path], ctx: bentoml.Context, abstain: bool = True
    ) -> list[dict[str, Any]]:
        """Several files (multipart field `files`, repeated): a list of `predict` answers in the same order.
        If any file is unusable the whole request is refused (422), naming the file by its position.
        `abstain`, `?site=NAME` / `X-CXR-Site` as for `predict`."""

        site = await self._site(ctx)
        if is_refusal(site):
            return refused_response(site, ctx)
        if not files:
            return refused_response(
                {"error": "no files: send one or more multipart fields named `files`", "status": 400}, ctx
            )
        if len(files) > MAX_FILES:
            return refused_upload(
                {"error": f"{len(files)} files in one request; the limit is {MAX_FILES}", "status": 413}, ctx
            )
        prepared = await self._prepare(files)
        refused = batch_refusal(prepared)
        if refused is not None:
            for r in prepared:
                if is_refusal(r):
                    monitor().refused(r["error"])
            return refused_response(refused, ctx)
        scored = await self._infer(prepared)
        answers = [self._answer(p, one, site, abstain) for p, one in zip(prepared, scored)]
        failed = batch_refusal(answers)
        return answers if failed is None else refused_response(failed, ctx)

    async def _site(self, ctx: bentoml.Context) -> str | dict[str, Any] | None:
        """The requested site, or a refusal (unknown site: the known ones are listed)."""
        site = requested_site(ctx)
        if site is None or is_refusal(site):
            return site
        return (await self._model()).site_refusal(site) or site

    @bentoml.api
    async def explain(
        self, file: Path, ctx: bentoml.Context, label: str | None = None
    ) -> Annotated[Path, ContentType("image/png")]:
        """Grad-CAM heatmap over the image (PNG). Headers: X-CXR-Label (explained label),
        X-CXR-Probability, X-CXR-Lung-Share (share of the heat inside a crude lung mask),
        X-CXR-Lung-Area (the share a uniform heatmap would get), X-CXR-Model, X-CXR-OOD (JSON: the film's
        out-of-distribution score and whether it is in distribution; when not, `predict` abstains and a warning
        says so), X-CXR-Warnings (JSON list).

        Lung-Share and Lung-Area are `none` (never 0) when there is no meaningful value, and a warning
        says why: the Grad-CAM is empty (no heat, or the same everywhere: the PNG then shows none), or
        no lung mask could be estimated on this image. The mask depends on the pixels only, so a
        PNG/JPEG and a DICOM of the same film get the same answer. The label may also come as ``?label=``."""
        unknown = unknown_query(ctx, {"label"})
        if unknown is not None:
            return refused_response(unknown, ctx)
        label = label or ctx.request.query_params.get("label")
        result = await self._remote("explain_upload", await anyio.Path(file).read_bytes(), label)
        if "error" in result:
            return refused_upload(result, ctx)

        def number(v: float | None) -> str:
            return "none" if v is None else f"{v:.4f}"

        headers = {
            "X-CXR-Label": result["label"],
            "X-CXR-Probability": number(result["probability"]),
            "X-CXR-Lung-Share": number(result["lung_share"]),
            "X-CXR-Lung-Area": number(result["lung_area"]),
            "X-CXR-Model": json.dumps(result["model"]),
            "X-CXR-OOD": json.dumps(result["ood"]),  # in_distribution false: predict would abstain
            "X-CXR-Warnings": json.dumps(result["warnings"]),
        }
        return Response(result["png"], media_type="image/png", headers=headers)

    @bentoml.api
    async def metadata(self) -> dict[str, Any]:
        """Model name/version/URI, training data hash, metrics, threshold, labels, preprocessing spec."""
        return (await self._model()).metadata()

    @bentoml.api
    async def healthz(self) -> dict[str, Any]:
        """Liveness (also GET /healthz, BentoML's probe)."""
        return {"status": "ok"}

    @bentoml.api
    async def readyz(self) -> dict[str, Any]:
        """Readiness: the model answers, within seconds, and uploads are not stuck behind slow decodes (503 with
        Retry-After otherwise; also GET /readyz, BentoML's probe)."""
        try:
            served = await asyncio.wait_for(self._model(), READY_WITHIN_S)
        except Exception as exc:  # the model service is still starting, has gone, or does not answer in time
            name = "no answer in time" if isinstance(exc, TimeoutError) else type(exc).__name__
            return not_ready(f"model not available ({name})")
        busy = self._saturated_for()
        if busy is not None:
            return not_ready(f"every upload decoder has been busy for {busy:.0f} s", retry_after=int(busy))
        return {"ready": True, "model": served.ref.to_dict()}

    def _saturated_for(self) -> float | None:
        """How long every decoder has been taken, when longer than SATURATED_AFTER_S; else None."""
        if self._decoders.available_tokens > 0 or not self._decoding_since:
            return None
        busy = time.monotonic() - max(self._decoding_since.values())
        return busy if busy > SATURATED_AFTER_S else None


CxrService.add_asgi_middleware(UploadLimit)
