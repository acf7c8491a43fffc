"""The training EMA: one foreach update per step, same numbers as the per-tensor formula."""

from __future__ import annotations

import copy

import torch

from cxr.training.setup import make_ema


def _per_tensor_reference(avg: dict[str, torch.Tensor], model: torch.nn.Module, n: int, decay: float) -> None:
    d = min(decay, (1 + n) / (10 + n))
    for name, cur in [*model.named_parameters(), *model.named_buffers()]:
        avg[name].copy_(avg[name] * d + cur.detach() * (1 - d))


def test_ema_matches_the_per_tensor_formula_exactly_including_integer_buffers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(144, 1)
    )
    model(torch.rand(2, 1, 8, 8))
    ema = make_ema(model, 0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reference: dict[str, torch.Tensor] = {}
    for n in range(6):  # AveragedModel copies on its first update, then averages with n = 1, 2, ...
        model(torch.rand(4, 1, 8, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
        ema.update_parameters(model)
        if n == 0:
            reference = {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
        else:
            _per_tensor_reference(reference, model, n, 0.9)
    averaged = dict([*ema.module.named_parameters(), *ema.module.named_buffers()])
    for name, value in reference.items():
        assert torch.equal(averaged[name], value), name
    assert averaged["1.num_batches_tracked"].dtype == torch.int64


def test_ema_off_at_zero_decay():
    assert make_ema(copy.deepcopy(torch.nn.Linear(2, 1)), 0.0) is None
