"""Serving speed: `bentoml serve` on loopback, with and without adaptive batching.

    python benchmarks/serving.py [--seconds 6] [--models resnet18,simple_cnn] [--torch-threads N] [--precision bf16]

For each model (resnet18 at 224 px and the default simple_cnn at 64 px, random weights: speed only)
and each mode (CXR_BATCHING=1: BentoML's adaptive batcher merges concurrent requests into one forward
pass; CXR_BATCHING=0: one request per forward pass; the same two-service topology either way) it
starts the real service and measures

* latency of /predict at concurrency 1 (p50/p95 over sequential requests) for a 1024x1024 DICOM
  and a 224x224 PNG;
* throughput of /predict with the PNG at concurrency 1, 8 and 32 (requests/s over a fixed time).

``--runtime``: onnxruntime against torch eager instead (CXR_RUNTIME=onnx / torch): each model (with its OOD check, as
training makes it) exported and served by both runtimes, both up at once, /predict alternated between them: p50 at
concurrency 1, then req/s at concurrency 8 in alternating windows, and the bare ``score()`` at batch 1 and 8. Writes
benchmarks/results/serving_onnx.json with ``--torch-threads 1`` (the setting for a shared machine), else
serving_onnx_threadsN.json.

``--ood``: the out-of-distribution check's cost instead: each model served with and without it, both up at once,
/predict alternated between them (p50 ratio; the issue's target is at most 1.10) and the bare ``score()``.

Writes benchmarks/results/serving.json (serving_bf16.json with ``--precision bf16``: CXR_PRECISION=bf16, the
forward pass under bfloat16 autocast, for CPUs with AMX and GPUs). Needs no shared data (inputs are synthetic).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from common import REPO, write_result
from support.serve_process import ServiceProcess

MODELS = {"resnet18": {"arch": "resnet18", "size": 224}, "simple_cnn": {"arch": "simple_cnn", "size": 64}}
CONCURRENCY = (1, 8, 32)
LATENCY_N = 25


def make_model(arch: str, size: int, out: Path, ood: bool = False) -> Path:
    """A random-init model directory (the cxr format) of the given architecture and input size; with ``ood``,
    an out-of-distribution check fitted on synthetic films as training fits one."""
    import torch

    from cxr.imaging import ReadLimits
    from cxr.models import build_model
    from cxr.models.card import Limits, Lineage, ModelCard, Preprocessing
    from cxr.models.predictor import Predictor
    from cxr.preprocess import PreprocessSpec

    torch.manual_seed(0)
    model = build_model(arch, 1)
    info = ModelCard(
        architecture=model.spec,
        preprocess=Preprocessing.of(PreprocessSpec(size=size)),
        read_limits=Limits(**vars(ReadLimits())),
        task="binary",
        labels=["normal", "pneumonia"],
        threshold=0.5,
        training=Lineage(dataset_hash="benchmark-random-weights", source="none"),
    )
    predictor = Predictor(model, info)
    if ood:
        predictor = with_ood_check(predictor, size)
    return predictor.save(out / f"{arch}{'_ood' if ood else ''}")


def with_ood_check(predictor, size: int):
    """The predictor with a check fitted on 64 rendered films (speed only: what it flags does not matter here)."""
    import torch

    from cxr.data.sources.synthetic import render
    from cxr.models.card import OodCheck
    from cxr.models.ood import METHOD, FeatureTap, OodDetector, ood_stages
    from cxr.models.predictor import Predictor

    rng = np.random.default_rng(0)
    films = np.stack([(render(rng, i % 2, 0.6, size) * 255).astype(np.uint8) for i in range(64)])
    stages = ood_stages(predictor.model)
    with FeatureTap(predictor.model, stages) as tap, torch.no_grad():
        predictor.model(torch.from_numpy(films).unsqueeze(1).float().div(255))
    detector = OodDetector.fitted(tap.take(), np.arange(64) % 2)
    check = OodCheck(method=METHOD, stages=stages, dims=detector.dims, classes=2, threshold=1e9, val_pass_rate=1.0,
                     fit_images=64)  # fmt: skip
    return Predictor(predictor.model, predictor.card.model_copy(update={"ood": check}), ood=detector)


def inputs() -> dict[str, bytes]:
    import io

    from PIL import Image as PILImage

    from cxr.data.sources.synthetic import Encoding, encode, make_dataset, render

    rng = np.random.default_rng(0)
    dicom = encode(make_dataset(render(rng, 1, 0.6, 1024), Encoding(bits=12), rng))
    buf = io.BytesIO()
    PILImage.fromarray((render(rng, 0, 0.6, 224) * 255).astype(np.uint8)).save(buf, format="PNG")
    return {"dicom_1024": dicom, "png_224": buf.getvalue()}


def bare_forward(model_dir: Path, threads: int, precision: str, seconds: float = 3.0) -> dict:
    """images/s of the bare forward pass at batch 1, 8 and 32 in this process: the most any batching
    can gain on this machine is the best batch's rate over batch 1's."""
    import torch

    from cxr.models.predictor import Predictor

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        predictor = Predictor.from_dir(model_dir, precision=precision)
        size = predictor.spec.size
        rates = {}
        for bs in (1, 8, 32):
            x = np.random.default_rng(0).integers(0, 256, (bs, size, size), dtype=np.uint8)
            predictor.predict_proba(x)  # warm-up
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                predictor.predict_proba(x)
                n += bs
            rates[str(bs)] = round(n / (time.perf_counter() - t0), 1)
    finally:
        torch.set_num_threads(before)
    return {"images_per_s_by_batch": rates, "batching_ceiling": round(max(rates.values()) / rates["1"], 2)}


def start_server(model_dir: Path, batching: bool, home: Path, precision: str, runtime: str = "torch") -> ServiceProcess:
    """The repository's params.yaml, this model, batching on or off, in this runtime."""
    return ServiceProcess(
        REPO,
        home / f"serve-{model_dir.name}-{int(batching)}-{runtime}.log",
        home=home,
        CXR_MODEL_URI=str(model_dir),
        CXR_BATCHING="1" if batching else "0",
        CXR_PRECISION=precision,
        CXR_RUNTIME=runtime,
    )


def latency(url: str, data: bytes, n: int = LATENCY_N) -> dict[str, float]:
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(3):
            client.post("/predict", files={"file": ("x", data)}).raise_for_status()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            client.post("/predict", files={"file": ("x", data)}).raise_for_status()
            times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1), "n": n}


async def _throughput(url: str, data: bytes, concurrency: int, seconds: float) -> dict[str, float]:
    statuses: Counter[int] = Counter()
    async with httpx.AsyncClient(
        base_url=url,
        timeout=120,
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    ) as client:

        async def worker(until: float, count: bool) -> None:
            while time.perf_counter() < until:
                r = await client.post("/predict", files={"file": ("x.png", data)})
                if count:
                    statuses[r.status_code] += 1

        warm_until = time.perf_counter() + 1.0
        await asyncio.gather(*(worker(warm_until, False) for _ in range(concurrency)))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(t0 + seconds, True) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    ok = statuses.get(200, 0)
    return {"requests_per_s": round(ok / elapsed, 1), "ok": ok, "errors": sum(statuses.values()) - ok}


def ood_overhead(models: list[str], n: int) -> None:
    """/predict p50 of one model served with and without its out-of-distribution check, both services up and
    their requests alternated (so a busy moment of the shared machine falls on both), and the bare score()."""
    from cxr.models.predictor import Predictor

    data, figures = inputs(), {"requests_per_arm": n, "models": {}}
    with tempfile.TemporaryDirectory(prefix="cxr-bench-ood-") as tmp:
        tmp = Path(tmp)
        for name in models:
            spec = MODELS[name]
            dirs = {
                "without": make_model(spec["arch"], spec["size"], tmp),
                "with": make_model(spec["arch"], spec["size"], tmp, ood=True),
            }
            servers = {arm: start_server(d, True, tmp, "fp32") for arm, d in dirs.items()}
            try:
                for server in servers.values():
                    server.wait_ready()
                clients = {arm: httpx.Client(base_url=s.url, timeout=60) for arm, s in servers.items()}
                times: dict[str, dict[str, list[float]]] = {k: {"with": [], "without": []} for k in data}
                for i in range(n + 3):
                    for kind, payload in data.items():
                        for arm in ("with", "without") if i % 2 else ("without", "with"):
                            t0 = time.perf_counter()
                            clients[arm].post("/predict", files={"file": ("x", payload)}).raise_for_status()
                            if i >= 3:  # the first requests warm both services
                                times[kind][arm].append(time.perf_counter() - t0)
            finally:
                for server in servers.values():
                    server.stop()
            p50 = {k: {arm: float(np.median(v)) * 1000 for arm, v in t.items()} for k, t in times.items()}
            bare = {arm: Predictor.from_dir(d) for arm, d in dirs.items()}
            x = np.stack([bare["with"].prepare_input(bare["with"].read(data["png_224"]))])
            bare_times: dict[str, list[float]] = {"with": [], "without": []}
            for i in range(200):
                for arm in ("with", "without") if i % 2 else ("without", "with"):
                    t0 = time.perf_counter()
                    bare[arm].score(x)
                    bare_times[arm].append(time.perf_counter() - t0)
            bare_p50 = {arm: float(np.median(v)) * 1000 for arm, v in bare_times.items()}
            figures["models"][name] = {
                "predict_p50_ms": {k: {a: round(v, 2) for a, v in arms.items()} for k, arms in p50.items()},
                "predict_p50_ratio": {k: round(arms["with"] / arms["without"], 3) for k, arms in p50.items()},
                "bare_score_p50_ms": {a: round(v, 3) for a, v in bare_p50.items()},
                "bare_score_ratio": round(bare_p50["with"] / bare_p50["without"], 3),
            }
    figures["summary"] = (
        "; ".join(
            f"{name}: /predict p50 with / without the OOD check "
            + ", ".join(f"{k} {r}x" for k, r in m["predict_p50_ratio"].items())
            + f" (bare forward batch 1: {m['bare_score_ratio']}x)"
            for name, m in figures["models"].items()
        )
        + "; target at most 1.10x"
    )
    write_result("serving_ood", figures)


RUNTIMES = ("torch", "onnx")


def alternated_p50(clients: dict[str, httpx.Client], data: bytes, n: int) -> dict[str, float]:
    """/predict p50 (ms) per runtime at concurrency 1, requests alternated (the order flips every round)."""
    times: dict[str, list[float]] = {rt: [] for rt in clients}
    for i in range(n + 3):
        for rt in RUNTIMES if i % 2 else RUNTIMES[::-1]:
            t0 = time.perf_counter()
            clients[rt].post("/predict", files={"file": ("x.png", data)}).raise_for_status()
            if i >= 3:  # the first requests warm both services
                times[rt].append(time.perf_counter() - t0)
    return {rt: round(float(np.median(v)) * 1000, 2) for rt, v in times.items()}


def alternated_rps(urls: dict[str, str], data: bytes, seconds: float, rounds: int = 2) -> dict[str, float]:
    """req/s per runtime at concurrency 8, in alternating windows of ``seconds``, averaged over ``rounds``."""
    rates: dict[str, list[float]] = {rt: [] for rt in urls}
    for i in range(rounds):
        for rt in RUNTIMES if i % 2 == 0 else RUNTIMES[::-1]:
            result = asyncio.run(_throughput(urls[rt], data, 8, seconds))
            assert result["errors"] == 0, f"{rt}: {result}"
            rates[rt].append(result["requests_per_s"])
    return {rt: round(float(np.mean(v)), 1) for rt, v in rates.items()}


def alternated_bare(model_dir: Path, threads: int, n: int = 60) -> dict[str, dict[str, float]]:
    """The bare score() p50 (ms) per runtime at batch 1 and 8, in this process, calls alternated."""
    import torch

    from cxr.models.onnx_runtime import predictor_class

    torch.set_num_threads(threads)  # before the session: it takes torch's thread count
    predictors = {rt: predictor_class(rt).from_dir(model_dir) for rt in RUNTIMES}
    size = predictors["torch"].spec.size
    out: dict[str, dict[str, float]] = {}
    for bs in (1, 8):
        x = np.random.default_rng(0).integers(0, 256, (bs, size, size), dtype=np.uint8)
        times: dict[str, list[float]] = {rt: [] for rt in RUNTIMES}
        for i in range(n + 3):
            for rt in RUNTIMES if i % 2 else RUNTIMES[::-1]:
                t0 = time.perf_counter()
                predictors[rt].score(x)
                if i >= 3:
                    times[rt].append(time.perf_counter() - t0)
        out[str(bs)] = {rt: round(float(np.median(v)) * 1000, 2) for rt, v in times.items()}
    return out


def runtime_comparison(models: list[str], seconds: float, n: int, threads: int) -> None:
    """onnxruntime against torch eager, both services up at once and measured alternately (so a busy moment of the
    shared machine falls on both): p50 at concurrency 1, req/s at concurrency 8, and the bare score()."""
    from cxr.models.onnx_export import export

    data = inputs()["png_224"]
    figures: dict = {"requests_per_arm": n, "seconds_per_window": seconds, "threads": threads, "models": {}}
    load_start, t_start = round(os.getloadavg()[0], 2), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cxr-bench-onnx-") as tmp:
        tmp = Path(tmp)
        for name in models:
            spec = MODELS[name]
            model_dir = make_model(spec["arch"], spec["size"], tmp, ood=True)
            t0 = time.perf_counter()
            export(model_dir)
            export_s = round(time.perf_counter() - t0, 1)
            servers = {rt: start_server(model_dir, True, tmp, "fp32", rt) for rt in RUNTIMES}
            try:
                for server in servers.values():
                    server.wait_ready()
                clients = {rt: httpx.Client(base_url=s.url, timeout=60) for rt, s in servers.items()}
                p50 = alternated_p50(clients, data, n)
                rps = alternated_rps({rt: s.url for rt, s in servers.items()}, data, seconds)
            finally:
                for server in servers.values():
                    server.stop()
            bare = alternated_bare(model_dir, threads)
            figures["models"][name] = {
                "image_size": spec["size"],
                "export_seconds": export_s,
                "predict_p50_ms_c1": p50,
                "requests_per_s_c8": rps,
                "bare_score_p50_ms": bare,
                "onnx_over_torch": {
                    "requests_per_s_c8": round(rps["onnx"] / rps["torch"], 2),
                    "predict_p50_c1": round(p50["onnx"] / p50["torch"], 2),
                    **{f"bare_p50_batch{b}": round(v["onnx"] / v["torch"], 2) for b, v in bare.items()},
                },
            }
            print(name, figures["models"][name], flush=True)
    figures["summary"] = (
        "; ".join(
            f"{name} {m['image_size']} px: onnx / torch req/s at c=8 {m['requests_per_s_c8']['onnx']} / "
            f"{m['requests_per_s_c8']['torch']}, p50 at c=1 {m['predict_p50_ms_c1']['onnx']} / "
            f"{m['predict_p50_ms_c1']['torch']} ms, bare score p50 batch 1 {m['bare_score_p50_ms']['1']['onnx']} / "
            f"{m['bare_score_p50_ms']['1']['torch']} ms"
            for name, m in figures["models"].items()
        )
        + f"; {threads} thread(s)"
    )
    figures["total_seconds"] = round(time.perf_counter() - t_start, 1)
    figures["load_average_1min"] = {"start": load_start, "end": round(os.getloadavg()[0], 2)}
    write_result("serving_onnx" if threads == 1 else f"serving_onnx_threads{threads}", figures)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ood", action="store_true", help="only the out-of-distribution check's cost (serving_ood.json)")
    ap.add_argument("--runtime", action="store_true", help="only onnxruntime against torch (serving_onnx.json)")
    ap.add_argument("--requests", type=int, default=60, help="with --ood / --runtime: requests per arm (and input)")
    ap.add_argument("--seconds", type=float, default=6.0, help="measuring time per throughput point")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="CXR_TORCH_THREADS of the model service, both modes (default: the service's own, all cores)",
    )
    ap.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="CXR_PRECISION of the model service and of the bare forward pass",
    )
    args = ap.parse_args()
    os.environ.setdefault("CXR_NO_PROGRESS", "1")
    if args.torch_threads:
        os.environ["CXR_TORCH_THREADS"] = str(args.torch_threads)
    from cxr.serving import service  # imported after the environment is set: its settings are what the servers use

    if args.ood:
        return ood_overhead(args.models.split(","), args.requests)
    if args.runtime:
        return runtime_comparison(args.models.split(","), args.seconds, args.requests, service.TORCH_THREADS)

    data = inputs()
    figures: dict = {
        "inputs": {k: len(v) for k, v in data.items()},
        "concurrency": list(CONCURRENCY),
        "throughput_input": "png_224",
        "seconds_per_point": args.seconds,
        "torch_threads": service.TORCH_THREADS,
        "max_batch_size": service.MAX_BATCH_SIZE,
        "precision": args.precision,
        "runs": {},
    }
    t_start = time.perf_counter()
    load_start = round(os.getloadavg()[0], 2)  # the machine may be shared: say how busy it was
    with tempfile.TemporaryDirectory(prefix="cxr-bench-serving-") as tmp:
        tmp = Path(tmp)
        for name in args.models.split(","):
            spec = MODELS[name]
            model_dir = make_model(spec["arch"], spec["size"], tmp)
            figures.setdefault("bare_forward", {})[name] = bare_forward(
                model_dir, figures["torch_threads"], args.precision
            )
            for batching in (True, False):
                server = start_server(model_dir, batching, tmp, args.precision)
                try:
                    server.wait_ready()
                    run = {
                        "image_size": spec["size"],
                        "latency": {k: latency(server.url, v) for k, v in data.items()},
                        "throughput": {
                            str(c): asyncio.run(_throughput(server.url, data["png_224"], c, args.seconds))
                            for c in CONCURRENCY
                        },
                    }
                finally:
                    server.stop()
                figures["runs"][f"{name}/{'batching' if batching else 'no_batching'}"] = run
                print(name, "batching" if batching else "no batching", run, flush=True)
    runs = figures["runs"]
    comparison, parts = {}, []
    for name in args.models.split(","):
        on, off = runs[f"{name}/batching"], runs[f"{name}/no_batching"]
        rps_on, rps_off = on["throughput"]["32"]["requests_per_s"], off["throughput"]["32"]["requests_per_s"]
        comparison[name] = {
            "batching_speedup_at_32": round(rps_on / max(rps_off, 1e-9), 2),
            "bare_forward_batching_ceiling": figures["bare_forward"][name]["batching_ceiling"],
            "p50_png_ms": {
                "batching": on["latency"]["png_224"]["p50_ms"],
                "no_batching": off["latency"]["png_224"]["p50_ms"],
            },
            "errors": sum(t["errors"] for r in (on, off) for t in r["throughput"].values()),
        }
        parts.append(
            f"{name} {MODELS[name]['size']} px: {rps_on} vs {rps_off} req/s at c=32 with/without batching "
            f"({comparison[name]['batching_speedup_at_32']}x; bare forward batch 8 or 32 vs 1: "
            f"{comparison[name]['bare_forward_batching_ceiling']}x), p50 PNG {off['latency']['png_224']['p50_ms']} ms "
            f"(no batching), p50 1024 DICOM {off['latency']['dicom_1024']['p50_ms']} ms"
        )
    figures["comparison"] = comparison
    figures["summary"] = "; ".join(
        [*parts, f"{figures['torch_threads']} torch threads, max batch {figures['max_batch_size']}, {args.precision}"]
    )
    figures["targets"] = {"batching_speedup_at_32": 2.0, "resnet18_p50_png_ms": 80}
    figures["total_seconds"] = round(time.perf_counter() - t_start, 1)
    figures["load_average_1min"] = {"start": load_start, "end": round(os.getloadavg()[0], 2)}
    write_result("serving" if args.precision == "fp32" else f"serving_{args.precision}", figures)


if __name__ == "__main__":
    main()
