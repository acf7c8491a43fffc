"""Training overhead: ``cxr.train.fit`` against a bare PyTorch loop on the same model, data, batch and augmentation.

    python benchmarks/train_overhead.py                   # PneumoniaMNIST 28 px, default simple_cnn, CPU
    python benchmarks/train_overhead.py --device cuda     # resnet50, Kermany at 224 px, bf16 autocast,
                                                          # channels_last, GPU utilisation sampled
    python benchmarks/train_overhead.py --arch resnet50 --dataset kermany --size 224 --max-batches 2  # smoke

The bare loop is what a project without tracking writes: ``build_model``, AdamW, the same prepared
arrays through ``PreparedData.batches``, the same ``augment``, a validation pass per epoch (every loop
that early-stops needs one) and nothing else. ``fit`` adds what cxr adds: MLflow run, params and
per-epoch metrics, weight EMA, best-epoch checkpoint, validation AUROC, threshold choice, saving the
model and logging it to MLflow. Runs alternate bare/fit/fit/bare so drift on this shared machine cancels.
Figures: images/s end to end (train images x epochs / wall seconds) and in the training loop alone.
Writes benchmarks/results/train_overhead.json (train_overhead_cuda.json on a GPU).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from common import WORK, require_shared, write_result
from cxr.config import Config, load_config
from cxr.data.augment import augment
from cxr.data.ingest import ingest
from cxr.data.loader import PreparedData
from cxr.data.prepare import prepare
from cxr.models import build_model
from cxr.training.fit import fit

log = logging.getLogger("train_overhead")
TARGET = 0.9  # fit images/s as a fraction of the bare loop's, end to end


def make_config(args: argparse.Namespace, work: Path) -> Config:
    if args.dataset == "pneumoniamnist":
        data = {"data.source": "medmnist", "data.path": str(require_shared("pneumoniamnist", "pneumoniamnist.npz"))}
    else:
        data = {"data.source": "kermany", "data.path": str(require_shared("kermany224")), "data.copy_images": False}
    return load_config(
        overrides={
            **data,
            "prepare.sizes": [args.size],
            "model.image_size": args.size,
            "model.arch": args.arch,
            "train.epochs": args.epochs,
            "train.device": args.device,
            "train.batch_size": args.batch_size,
            "train.early_stopping.patience": args.epochs + 1,  # every run trains exactly --epochs epochs
            "train.max_train_batches": args.max_batches,
            "train.ensemble": 1,  # the overhead of fit per network, against one bare loop
            "paths.raw": str(work / "raw"),
            "paths.prepared": str(work / "prepared"),
            "paths.model": str(work / "model"),
            "paths.reports": str(work / "reports"),
            "mlflow.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
            "mlflow.artifact_location": str(work / "mlartifacts"),
        }
    )


def ensure_prepared(cfg: Config) -> None:
    """Prepare once; later runs reuse the arrays (this benchmark is about training, not data)."""
    try:
        PreparedData(cfg.paths.prepared, cfg.model.image_size)
    except Exception:  # noqa: BLE001 - absent or stale: rebuild
        ingest(cfg)
        prepare(cfg)


def bare_loop(cfg: Config, data: PreparedData, device: torch.device) -> dict[str, float]:
    """The baseline: train + one validation pass per epoch, in fit's channels_last layout (and bf16 on CUDA)."""
    torch.use_deterministic_algorithms(cfg.train.deterministic and device.type == "cpu", warn_only=True)
    torch.manual_seed(cfg.project.seed)
    gen = torch.Generator().manual_seed(cfg.project.seed)
    model = build_model(cfg.model.arch, data.n_outputs, dropout=cfg.model.dropout, width=cfg.model.width)
    # fit's layout on every device: on this CPU a contiguous simple_cnn trains 1.4-1.7x slower, which is
    # a layout effect, not the overhead measured here
    model = model.to(device).to(memory_format=torch.channels_last)
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    train_idx, val_idx = data.split("train"), data.split("val")
    bs, cap = cfg.train.batch_size, cfg.train.max_train_batches
    seen, loop_s = 0, 0.0
    t_start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(cfg.train.epochs):
        model.train()
        t0 = time.perf_counter()
        for i, (x, y, _, _) in enumerate(data.batches(train_idx, bs, shuffle=True, generator=gen, device=device)):
            if cap and i >= cap:
                break
            x = augment(x, cfg.train.augment, gen).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = model(x)
            loss = F.binary_cross_entropy_with_logits(logits.float().view(-1), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(x)
        _sync(device)
        loop_s += time.perf_counter() - t0
        model.eval()
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            for x, _, _, _ in data.batches(val_idx, bs * 2, device=device):
                model(x.contiguous(memory_format=torch.channels_last)).float().cpu()
    return {
        "seconds": time.perf_counter() - t_start,
        "cpu_seconds": time.process_time() - cpu_start,
        "loop_seconds": loop_s,
        "images": seen,
    }


def fit_run(cfg: Config, work: Path) -> dict[str, float]:
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = fit(cfg, model_dir=work / "model", log_model=True)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    loop = sum(h["epoch_seconds"] for h in result.history)
    return {"seconds": seconds, "cpu_seconds": cpu, "loop_seconds": loop, "images": result.images_per_second * loop}


class GpuSampler:
    """Mean GPU utilisation (%) while running: torch.cuda.utilization() (pynvml) or nvidia-smi, every 0.2 s."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples, self._stop = device, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "GpuSampler":
        if self.device.type == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            value = _gpu_utilisation(self.device)
            if value is not None:
                self.samples.append(value)

    @property
    def mean(self) -> float | None:
        return round(statistics.fmean(self.samples), 1) if self.samples else None


def _gpu_utilisation(device: torch.device) -> float | None:
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # noqa: BLE001 - no pynvml: ask nvidia-smi
        import subprocess

        try:
            out = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    f"--id={device.index or 0}",
                ],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout
            return float(out.strip().splitlines()[0])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dataset", choices=["pneumoniamnist", "kermany"], default=None)
    ap.add_argument("--arch", default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=4, help="epochs per run")
    ap.add_argument("--reps", type=int, default=3, help="bare/fit pairs, alternated bare-fit-fit-bare-bare-fit")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-batches", type=int, default=None, help="cap batches per epoch (smoke runs)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("CXR_NO_PROGRESS", "1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--device {args.device}: no CUDA device here (torch.cuda.is_available() is False); "
            "run without --device for the CPU benchmark, or on a GPU machine for this one"
        )
    gpu = device.type == "cuda"
    args.dataset = args.dataset or ("kermany" if gpu else "pneumoniamnist")
    args.arch = args.arch or ("resnet50" if gpu else "simple_cnn")
    args.size = args.size or (224 if args.dataset == "kermany" else 28)

    load_start = round(os.getloadavg()[0], 2)  # other users' work on a shared machine
    work = WORK / f"train_overhead_{args.dataset}_{args.size}"
    cfg = make_config(args, work)
    ensure_prepared(cfg)
    data = PreparedData(cfg.paths.prepared, args.size)
    # Warm-up, not timed: imports, the MLflow database and experiment, allocator, oneDNN/cuDNN kernels.
    warm = cfg.override({"train.epochs": 1, "train.max_train_batches": 2})
    fit_run(warm, work)
    bare_loop(warm, data, device)

    runs: dict[str, list[dict[str, float]]] = {"bare": [], "fit": []}
    utilisation: dict[str, list[float | None]] = {"bare": [], "fit": []}
    for rep in range(args.reps):
        for kind in ("bare", "fit") if rep % 2 == 0 else ("fit", "bare"):
            with GpuSampler(device) as sampler:
                r = bare_loop(cfg, data, device) if kind == "bare" else fit_run(cfg, work)
            runs[kind].append(r)
            utilisation[kind].append(sampler.mean)
            log.info("rep %d %s: %.2fs (training loop %.2fs)", rep, kind, r["seconds"], r["loop_seconds"])
    figures = summarise(runs, args, cfg)
    figures["load_average_1m"] = {"start": load_start, "end": round(os.getloadavg()[0], 2)}
    if gpu:
        figures["gpu"] = torch.cuda.get_device_name(device)
        figures["gpu_utilisation_percent"] = {k: v for k, v in utilisation.items()}
    figures["summary"] = summary_line(figures, args)
    write_result("train_overhead" if not gpu else "train_overhead_cuda", figures)


def summarise(runs: dict[str, list[dict[str, float]]], args: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    def ips(r: dict[str, float], key: str) -> float:
        return r["images"] / r[key]

    pairs = list(zip(runs["bare"], runs["fit"]))
    ratio = [ips(f, "seconds") / ips(b, "seconds") for b, f in pairs]
    loop_ratio = [ips(f, "loop_seconds") / ips(b, "loop_seconds") for b, f in pairs]
    # CPU seconds of this process: less moved by other users' bursts than wall time (reported beside it)
    cpu_ratio = [ips(f, "cpu_seconds") / ips(b, "cpu_seconds") for b, f in pairs]
    med = statistics.median
    return {
        "dataset": args.dataset,
        "image_size": args.size,
        "arch": args.arch,
        "device": args.device,
        "epochs_per_run": args.epochs,
        "batch_size": args.batch_size,
        "reps": args.reps,
        "train_images_per_epoch": int(runs["bare"][0]["images"] / args.epochs),
        "ema_decay": cfg.train.ema_decay,
        "mlflow": cfg.mlflow.enabled,
        "log_model": True,
        "bare_images_per_s": round(med([ips(r, "seconds") for r in runs["bare"]]), 1),
        "fit_images_per_s": round(med([ips(r, "seconds") for r in runs["fit"]]), 1),
        "fit_over_bare": round(med(ratio), 3),
        "fit_over_bare_by_rep": [round(r, 3) for r in ratio],
        "loop_fit_over_bare": round(med(loop_ratio), 3),
        "cpu_time_fit_over_bare": round(med(cpu_ratio), 3),
        "cpu_time_fit_over_bare_by_rep": [round(r, 3) for r in cpu_ratio],
        "bare_seconds": [round(r["seconds"], 2) for r in runs["bare"]],
        "fit_seconds": [round(r["seconds"], 2) for r in runs["fit"]],
        "fit_outside_loop_seconds": round(med([r["seconds"] - r["loop_seconds"] for r in runs["fit"]]), 2),
        "bare_outside_loop_seconds": round(med([r["seconds"] - r["loop_seconds"] for r in runs["bare"]]), 2),
        # validation is on both sides, so this is what fit adds once per run (MLflow, model logging, saving)
        "fit_extra_fixed_seconds": round(
            med([r["seconds"] - r["loop_seconds"] for r in runs["fit"]])
            - med([r["seconds"] - r["loop_seconds"] for r in runs["bare"]]),
            2,
        ),
        "target": {"min_fit_over_bare": TARGET, "met": med(ratio) >= TARGET},
    }


def summary_line(f: dict[str, Any], args: argparse.Namespace) -> str:
    line = (
        f"[{f['device']}] {f['arch']} {f['image_size']} px on {f['dataset']}, {f['epochs_per_run']} epochs/run: "
        f"fit {f['fit_images_per_s']:.0f} vs bare {f['bare_images_per_s']:.0f} img/s = {f['fit_over_bare']:.2f}x "
        f"end to end, {f['cpu_time_fit_over_bare']:.2f}x in CPU time (training loop alone "
        f"{f['loop_fit_over_bare']:.2f}x; fit spends "
        f"{f['fit_outside_loop_seconds']} s outside the loop vs {f['bare_outside_loop_seconds']} s); "
        f"target >= {TARGET} {'met' if f['target']['met'] else 'MISSED'}"
    )
    if "gpu_utilisation_percent" in f:
        u = f["gpu_utilisation_percent"]
        line += f"; GPU utilisation bare {u['bare']} % / fit {u['fit']} %"
    return line


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
