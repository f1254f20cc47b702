"""Projection onto an l2 ball: caps |sigma(x)|_2 for a-priori certificates, 1-Lipschitz."""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks


class L2BallProjection(nn.Module):
    """x -> x * min(1, R / |x|_2) along ``dim``, the nearest point of the ball of radius R.

    Computed in float64 onto radius R (1 - 2 u), u the unit roundoff of x's dtype, so the
    output ROUNDED to that dtype still has norm <= R: a-priori certificates rely on it.
    Projection onto a closed convex set is 1-Lipschitz in l2: it costs nothing in a bound.
    """

    def __init__(self, radius: float, dim: int = -1) -> None:
        super().__init__()
        self._radius = _checks.positive_finite("radius", radius)
        self.dim = _checks.integer("dim", dim, -(10**9))

    @property
    def radius(self) -> float:
        """The cap R on |output|_2 (read-only: certificates are computed from it)."""
        return self._radius

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        target = self._radius * (1 - torch.finfo(x.dtype).eps)  # eps = 2 u
        wide = x.to(torch.float64)
        norm = wide.norm(dim=self.dim, keepdim=True)
        return (wide * (target / norm.clamp_min(target))).to(x.dtype)

    def lipschitz_bound(self) -> float:
        return 1.0

    def extra_repr(self) -> str:
        return f"radius={self._radius:g}, dim={self.dim}"
