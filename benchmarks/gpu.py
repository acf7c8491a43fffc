"""The GPU path: resnet50 at 224 px, bf16 autocast, channels_last, fed by cxr's own data path.

    python benchmarks/gpu.py                 # one GPU (and 2-GPU DDP scaling when two are visible)
    python benchmarks/gpu.py --compile       # the same with torch.compile
    python benchmarks/gpu.py --prepared data/prepared   # a prepared folder of your own (needs 224 px)

Figures (benchmarks/results/gpu.json, gpu_compile.json with --compile):

- ``data_images_per_s``: ``PreparedData.batches`` (memory-mapped uint8 arrays, pinned, non-blocking copies)
  + ``augment`` on the GPU, no model: what the data path alone can feed.
- ``train_images_per_s``: training steps (forward, backward, AdamW) fed by that data path, as ``fit`` runs
  them; ``compute_images_per_s``: the same steps on one batch already on the GPU (the model's ceiling).
- ``gpu_busy_pct``: the share of wall time during which at least one CUDA kernel ran, from torch.profiler's
  kernel intervals (CUPTI, shipped with torch) over ``--profile-steps`` fed training steps; the profiler's own
  overhead makes it a lower bound. ``nvml_utilization_pct``: ``torch.cuda.utilization()`` sampled every 0.2 s
  over the fed training steps when pynvml is installed (the driver's "a kernel ran in the last period", coarser).
- ``ddp``: with two visible GPUs, 2 ranks (``mp.spawn``, nccl) each training on its own GPU-resident batch:
  images/s over both and scaling efficiency against twice the one-GPU compute figure.

Without CUDA it prints one line and writes nothing. The prepared set is built once (synthetic films at 256 px,
prepared at 224 px) under benchmarks/work/gpu/ unless ``--prepared`` names one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from common import WORK, write_result
from cxr.config import AugmentConfig, Config
from cxr.data.augment import augment
from cxr.data.ingest import ingest
from cxr.data.loader import PreparedData
from cxr.data.prepare import prepare
from cxr.models import build_model
from support.serve_process import free_port

NO_CUDA = "no CUDA device: gpu.py measures nothing on CPU; run it on a GPU machine"
SIZE = 224


def build_prepared(films: int) -> Path:
    """A synthetic set prepared at 224 px, built once under benchmarks/work/gpu/."""
    root = WORK / "gpu" / f"synthetic_{films}"
    cfg = Config().override(
        {
            "data.synthetic.n_patients": films,
            "data.synthetic.images_per_patient_max": 1,
            "data.synthetic.size": 256,
            "paths.raw": str(root / "raw"),
            "paths.prepared": str(root / "prepared"),
            "prepare.sizes": [SIZE],
            "model.image_size": SIZE,
            "prepare.workers": os.cpu_count() or 2,
        }
    )
    if not (root / "prepared" / "card.json").exists():
        ingest(cfg)
        prepare(cfg)
    return root / "prepared"


def fed_batches(data: PreparedData, batch: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """cxr's training data path, epoch after epoch: shuffled memmap batches + augmentation on the GPU."""
    gen, aug, index = torch.Generator().manual_seed(0), AugmentConfig(), data.split("train")
    if len(index) < batch:
        raise SystemExit(f"{data.root} has {len(index)} training films, fewer than one batch of {batch}")
    while True:
        for x, y, _, _ in data.batches(index, batch, shuffle=True, generator=gen, device=device):
            if len(x) == batch:  # a short last batch would recompile under --compile
                yield augment(x, aug, gen).contiguous(memory_format=torch.channels_last), y


def resident_batches(batch: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    x = torch.rand(batch, 1, SIZE, SIZE, device=device).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, device=device) < 0.4).float()
    while True:
        yield x, y


def make_model(device: torch.device, compile_: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_model("resnet50", 1).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return (torch.compile(model) if compile_ else model), opt


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: Iterator, steps: int) -> float:
    """Run `steps` training steps; returns wall seconds (synchronised)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits.float().view(-1), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def data_only(batches: Iterator, steps: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        next(batches)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def kernel_busy_pct(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: Iterator, steps: int) -> float:
    """Union of the intervals of GPU activity (kernels, copies) / wall time of `steps` profiled training steps (%)."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = train_steps(model, opt, batches, steps)
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and not e.is_user_annotation  # annotations span idle gaps too
    )
    busy, end = 0.0, float("-inf")
    for start, stop in spans:  # merge overlapping kernels (several streams) before summing
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return round(100.0 * busy / 1e6 / wall, 1)  # profiler times are microseconds


class NvmlSampler:
    """torch.cuda.utilization() every 0.2 s (needs pynvml; silent without it)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "NvmlSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.samples.append(float(torch.cuda.utilization()))
            except Exception:  # noqa: BLE001 - no pynvml / no NVML: leave the figure out
                return

    @property
    def mean(self) -> float | None:
        return round(statistics.fmean(self.samples), 1) if self.samples else None


def _ddp_rank(rank: int, port: int, args: argparse.Namespace, out: Any) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=2)
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    model, opt = make_model(device, args.compile)
    model = DistributedDataParallel(model, device_ids=[rank])
    batches = resident_batches(args.batch, device)
    train_steps(model, opt, batches, args.warmup)
    dist.barrier()
    seconds = train_steps(model, opt, batches, args.steps)
    dist.barrier()
    if rank == 0:
        out.put(seconds)
    dist.destroy_process_group()


def ddp_scaling(args: argparse.Namespace, one_gpu_ips: float) -> dict[str, Any]:
    import torch.multiprocessing as mp

    port = free_port()  # on 127.0.0.1, for the rendezvous
    out = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_ddp_rank, args=(port, args, out), nprocs=2, join=True)
    ips = 2 * args.batch * args.steps / out.get()
    return {"gpus": 2, "images_per_s": round(ips, 1), "scaling_efficiency": round(ips / (2 * one_gpu_ips), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128, help="images per step (per GPU under DDP)")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per figure")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (cuDNN autotune, compilation)")
    ap.add_argument("--profile-steps", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--prepared", type=Path, help="a prepared folder with 224-px arrays (default: synthetic)")
    ap.add_argument("--films", type=int, default=2048, help="synthetic films when --prepared is not given")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda", 0)
    data = PreparedData(args.prepared or build_prepared(args.films), SIZE)
    fed = fed_batches(data, args.batch, device)
    data_only(fed, args.warmup)
    data_s = data_only(fed, args.steps)

    model, opt = make_model(device, args.compile)
    resident = resident_batches(args.batch, device)
    train_steps(model, opt, resident, args.warmup)
    compute_s = train_steps(model, opt, resident, args.steps)
    with NvmlSampler() as nvml:
        train_s = train_steps(model, opt, fed, args.steps)
    per_s = args.batch * args.steps
    figures: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(device),
        "arch": "resnet50",
        "size": SIZE,
        "batch": args.batch,
        "compile": args.compile,
        "precision": "bf16 autocast, channels_last",
        "data_images_per_s": round(per_s / data_s, 1),
        "train_images_per_s": round(per_s / train_s, 1),
        "compute_images_per_s": round(per_s / compute_s, 1),
        "gpu_busy_pct": kernel_busy_pct(model, opt, fed, args.profile_steps),
        "nvml_utilization_pct": nvml.mean,
        "prepared": str(data.root),
        "train_films": len(data.split("train")),
    }
    two = torch.cuda.device_count() >= 2
    figures["ddp"] = ddp_scaling(args, figures["compute_images_per_s"]) if two else "one GPU visible: not measured"
    figures["summary"] = (
        f"{figures['gpu']}, resnet50 224 px bf16{' compiled' if args.compile else ''}: train "
        f"{figures['train_images_per_s']} img/s fed by the data path (compute alone {figures['compute_images_per_s']}), "
        f"data path alone {figures['data_images_per_s']} img/s, GPU busy {figures['gpu_busy_pct']}%"
        + (f"; 2-GPU DDP x{figures['ddp']['scaling_efficiency']} of linear" if two else "")
    )
    write_result("gpu_compile" if args.compile else "gpu", figures)


if __name__ == "__main__":
    main()
