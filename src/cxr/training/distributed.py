"""Data-parallel training under torchrun: which process this is, its device, the process group and the few
collectives the training loop needs.

Every rank trains its shard of each global batch (DistributedDataParallel averages the gradients); rank 0 alone
validates, logs to MLflow, chooses the threshold and saves, and the others follow its per-epoch decisions
(learning-rate plateau, early stopping) through one broadcast. Outside torchrun (no ``WORLD_SIZE``, or a world
of one) nothing here starts anything: a single process trains exactly as before.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from cxr.data.loader import Shard
from cxr.errors import UserError

# Rank 0 validates each epoch, then chooses the threshold and saves while the others wait: allow it that long.
WAIT_FOR_RANK0 = timedelta(hours=2)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> Shard | None:
        return Shard(self.rank, self.world) if self.active else None


SINGLE = Ranks()  # one process, no torchrun


def ranks_from_env() -> Ranks:
    """torchrun's WORLD_SIZE / RANK / LOCAL_RANK; a single process without them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def refuse_under_torchrun(command: str) -> None:
    if ranks_from_env().active:
        raise UserError(f"`cxr {command}` runs in one process; launch it without torchrun (`cxr train` can use it)")


def check_batch_size(batch_size: int, ranks: Ranks) -> None:
    if batch_size % ranks.world:
        raise UserError(
            f"train.batch_size={batch_size} is the global batch and does not divide among {ranks.world} processes; "
            f"use a multiple of {ranks.world}"
        )


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """One GPU per process, cuda:LOCAL_RANK, when training on CUDA; the CPU stays the CPU."""
    if not ranks.active or device.type != "cuda":
        return device
    if ranks.local_rank >= torch.cuda.device_count():
        raise UserError(
            f"LOCAL_RANK={ranks.local_rank} but this node has {torch.cuda.device_count()} CUDA devices; "
            "start at most one process per GPU (--nproc-per-node)"
        )
    return torch.device("cuda", ranks.local_rank)


@contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """NCCL on CUDA, gloo on CPU, for the duration of a fit; nothing for a single process."""
    if not ranks.active:
        yield
        return
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=WAIT_FOR_RANK0, device_id=device if cuda else None)
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, device: torch.device, ranks: Ranks) -> torch.nn.Module:
    """What the training step calls: the model itself, or DistributedDataParallel around it (gradients averaged)."""
    if not ranks.active:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def decorrelate_dropout(seed: int, ranks: Ranks) -> None:
    """Ranks seeded alike would draw the same dropout masks for their batches: give each its own stream."""
    if ranks.active:
        torch.manual_seed(int(np.random.SeedSequence([seed, ranks.rank]).generate_state(1)[0]))


def epoch_totals(total_loss: torch.Tensor, images: int, ranks: Ranks) -> tuple[torch.Tensor, int]:
    """(summed per-step loss averaged over the ranks, images seen by all ranks)."""
    if not ranks.active:
        return total_loss, images
    both = torch.stack(
        [total_loss.double(), torch.tensor(float(images), dtype=torch.float64, device=total_loss.device)]
    )
    dist.all_reduce(both)
    return both[0] / ranks.world, int(both[1].item())


def decisions_of_rank0(val_auroc: float, stop: bool, ranks: Ranks, device: torch.device) -> tuple[float, bool]:
    """Rank 0's validation AUROC and stop decision, the same on every rank (rank 0's own values pass through)."""
    if not ranks.active:
        return val_auroc, stop
    sent = torch.tensor([val_auroc, float(stop)], dtype=torch.float64, device=device)
    dist.broadcast(sent, src=0)
    return float(sent[0]), bool(sent[1] > 0)


def wait_for_rank0(ranks: Ranks) -> None:
    if ranks.active:
        dist.barrier()


@contextmanager
def quiet_unless_main(ranks: Ranks) -> Iterator[None]:
    """Ranks other than 0 show no progress and log only warnings: one process speaks for the run."""
    if ranks.is_main:
        yield
        return
    logger, env = logging.getLogger("cxr"), os.environ.get("CXR_NO_PROGRESS")
    level, os.environ["CXR_NO_PROGRESS"] = logger.level, "1"
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
        if env is None:
            os.environ.pop("CXR_NO_PROGRESS", None)
        else:
            os.environ["CXR_NO_PROGRESS"] = env
