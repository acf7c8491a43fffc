"""Transfer learning as teams do it: ``model.freeze`` holds the backbone, or its first N blocks, fixed (BatchNorm
statistics included) until ``model.unfreeze_epoch``. The backbone's learning rate scale is in
:func:`cxr.training.setup.make_optimizer`.
"""

from __future__ import annotations

import torch
from torch import nn

from cxr.errors import UserError
from cxr.models.networks import arch_spec


def check_freeze(arch: str, freeze: str | int) -> None:
    """One line if ``model.freeze`` asks for more blocks than ``arch`` has."""
    blocks = arch_spec(arch).freeze_blocks
    if isinstance(freeze, int) and freeze > len(blocks):
        raise UserError(
            f"model.freeze={freeze} but {arch} has {len(blocks)} blocks ({', '.join(blocks)}): "
            f"freeze at most {len(blocks)}, or the whole backbone"
        )


def frozen_modules(model: nn.Module, freeze: str | int) -> list[str]:
    """Names of the modules ``freeze`` holds: none, every backbone module, or those wholly inside its first N blocks
    (the backbone's modules in registration order, which is the order they run in, up to the end of block N)."""
    if freeze == "none":
        return []
    names = [f"backbone.{n}" if n else "backbone" for n, _ in model.backbone.named_modules()]
    if freeze == "backbone":
        return names
    check_freeze(model.arch, freeze)
    last = model.blocks[int(freeze) - 1]
    end = max(i for i, n in enumerate(names) if n == last or n.startswith(f"{last}."))
    after = names[end + 1 :]
    return [n for n in names[: end + 1] if not any(a.startswith(f"{n}.") for a in after)]


class Frozen:
    """The frozen part of ``model``: its parameters take no gradient and its modules stay in eval mode."""

    def __init__(self, model: nn.Module, freeze: str | int) -> None:
        self.model, self.names = model, frozen_modules(model, freeze)
        self._copies: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        for p in self._tensors(model, buffers=False):
            p.requires_grad_(False)

    def _tensors(self, model: nn.Module, buffers: bool = True) -> list[torch.Tensor]:
        mods = [model.get_submodule(n) for n in self.names]
        return [t for m in mods for t in [*m.parameters(recurse=False), *(m.buffers(recurse=False) if buffers else [])]]

    def hold(self) -> None:
        """After ``model.train()``: BatchNorm (and dropout) of the frozen modules back to eval mode."""
        for name in self.names:  # each frozen module's children are in the list too
            self.model.get_submodule(name).training = False

    def keep_in(self, copy: nn.Module) -> None:
        """Copy the frozen tensors into ``copy`` (the weight EMA): averaging a constant moves it by rounding."""
        if not self.names:
            return
        if self._copies is None:
            self._copies = (self._tensors(copy), self._tensors(self.model))
        with torch.no_grad():
            torch._foreach_copy_(*self._copies)

    def release(self) -> None:
        """Everything trains from now on."""
        for p in self._tensors(self.model, buffers=False):
            p.requires_grad_(True)
        self.names, self._copies = [], None
