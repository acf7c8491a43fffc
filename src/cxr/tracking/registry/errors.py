"""What the registry refuses: one error type for every registry command."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cxr.errors import UserError

if TYPE_CHECKING:
    pass


class RegistryError(UserError):
    """A registry request that cannot be done as asked."""
