"""GroupSort and MaxMin activations: gradient-norm-preserving, 1-Lipschitz in l2."""

from __future__ import annotations

import torch
from torch import nn

from .. import _backend, _checks
from .. import functional as F


class GroupSort(nn.Module):
    """Sort ascending inside consecutive groups of ``group_size`` along ``dim``.

    ``group_size`` is the SIZE of each group (as in deel-torchlip; LNets' ``num_units`` is the
    number of groups). ``dim=1`` follows PyTorch's N x C x ... layout; a group size equal to
    the dimension's size is a full sort.
    """

    def __init__(self, group_size: int = 2, dim: int = 1, backend: str | None = None) -> None:
        super().__init__()
        self.group_size = _checks.integer("group_size", group_size, 1)
        self.dim = _checks.integer("dim", dim, -(10**9))
        self.backend = _backend.check_name(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.groupsort(x, self.group_size, self.dim, self.backend)

    def lipschitz_bound(self) -> float:
        """Sorting is a piecewise permutation: 1-Lipschitz in l2."""
        return 1.0

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, dim={self.dim}"


class MaxMin(GroupSort):
    """GroupSort with groups of 2: each pair becomes (min, max)."""

    def __init__(self, dim: int = 1, backend: str | None = None) -> None:
        super().__init__(2, dim, backend)
