"""Projection onto an l2 ball: caps |sigma(x)|_2 for a-priori certificates, 1-Lipschitz."""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks


class L2BallProjection(nn.Module):
    """x -> x * min(1, radius / |x|_2) along ``dim``: the nearest point of the ball.

    Projection onto a closed convex set is 1-Lipschitz in l2, so it costs nothing in a bound.
    """

    def __init__(self, radius: float, dim: int = -1) -> None:
        super().__init__()
        self.radius = _checks.positive_finite("radius", radius)
        self.dim = _checks.integer("dim", dim, -(10**9))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.norm(dim=self.dim, keepdim=True)
        return x * (self.radius / norm.clamp_min(self.radius)).to(x.dtype)

    def lipschitz_bound(self) -> float:
        return 1.0

    def extra_repr(self) -> str:
        return f"radius={self.radius:g}, dim={self.dim}"
