"""Data-parallel pieces without a process group: torchrun's environment, the shards of a batch, the augmentation
each rank applies and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cxr.cli import app
from cxr.config import AugmentConfig, Config
from cxr.data.augment import augment
from cxr.data.loader import PreparedData, Shard
from cxr.errors import UserError
from cxr.training import distributed
from cxr.training.fit import fit
from cxr.training.loop import augment_shard


def fake_data(n: int) -> PreparedData:
    """A PreparedData whose image i is filled with i (no files): rows can be told apart by their pixels."""
    data = PreparedData.__new__(PreparedData)
    data.images = np.repeat(np.arange(n, dtype=np.uint8), 16).reshape(n, 4, 4)
    data.targets = (np.arange(n) % 2).astype(np.float32)
    data.tabular = np.zeros((n, 8), np.float32)
    return data


def test_ranks_come_from_torchruns_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.ranks_from_env() == distributed.SINGLE and distributed.SINGLE.shard is None
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: trains exactly as without it
    assert not distributed.ranks_from_env().active
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ranks = distributed.ranks_from_env()
    assert (ranks.rank, ranks.world, ranks.local_rank, ranks.is_main) == (3, 4, 1, False)
    assert ranks.shard == Shard(3, 4)


@pytest.mark.parametrize("n_train", [40, 37, 33])  # last batch full, odd (padded), shorter than the world
def test_ranks_together_read_exactly_the_single_process_batches(n_train):
    data, index, bs, world = fake_data(60), np.arange(5, 5 + n_train), 8, 4
    single = list(data.batches(index, bs, shuffle=True, generator=torch.Generator().manual_seed(3)))
    per_rank = [
        list(data.batches(index, bs, shuffle=True, generator=torch.Generator().manual_seed(3), shard=Shard(r, world)))
        for r in range(world)
    ]
    assert all(len(batches) == len(single) for batches in per_rank)  # the same optimizer steps per epoch
    for b, (_, _, _, rows) in enumerate(single):
        shards = [per_rank[r][b] for r in range(world)]
        assert len({len(s[3]) for s in shards}) == 1  # every rank takes as many rows
        assert set(np.concatenate([s[3] for s in shards])) == set(rows)  # together: this batch, nothing else
        assert len(np.concatenate([s[3] for s in shards])) - len(rows) < world  # padded by fewer than world
        for x, y, _, shard_rows in shards:  # each rank's pixels and targets are its rows'
            assert x[:, 0, 0, 0].mul(255).round().long().tolist() == shard_rows.tolist()
            assert y.tolist() == data.targets[shard_rows].tolist()


def test_each_rank_augments_its_images_as_one_process_augments_the_global_batch():
    cfg, n, world = AugmentConfig(), 9, 2
    x = torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    whole = augment(x, cfg, torch.Generator().manual_seed(5))
    for rank in range(world):
        shard = Shard(rank, world)
        at = torch.from_numpy(shard.positions(n))
        mine = augment_shard(x[at], cfg, torch.Generator().manual_seed(5), shard, n)
        torch.testing.assert_close(mine, whole[at])


def test_a_batch_size_that_does_not_divide_among_the_processes_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = Config().override({"train.batch_size": 15, "paths.prepared": str(tmp_path / "none")})
    with pytest.raises(UserError, match=r"train.batch_size=15 .* among 2 processes; use a multiple of 2"):
        fit(cfg)


def test_tune_under_torchrun_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    res = CliRunner().invoke(app, ["tune", "--params", "no-such.yaml"])
    assert res.exit_code == 2 and "without torchrun" in res.output
