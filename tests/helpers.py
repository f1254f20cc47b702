"""Test helpers shared across files (independent of the code under test)."""

import torch
from torch import nn


def lipschitz_ascent(
    model: nn.Module, in_features: int, steps: int = 300, pairs: int = 16
) -> float:
    """Largest |f(x) - f(y)| / |x - y| found by Adam ascent over ``pairs`` pairs (float64)."""
    x = torch.randn(pairs, in_features, dtype=torch.float64, requires_grad=True)
    y = (x.detach() + 0.1 * torch.randn_like(x)).requires_grad_(True)
    opt = torch.optim.Adam([x, y], lr=0.02)
    best = 0.0
    for _ in range(steps):
        ratio = (model(x) - model(y)).norm(dim=1) / (x - y).norm(dim=1).clamp_min(1e-12)
        best = max(best, ratio.max().item())
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    return best


def naive_lip_linear(x, w, b, u, v, k):
    """k x W^T / (u^T W v) + b in plain autograd: the formula LipLinear's backward must match."""
    out = k * (x @ w.t()) / torch.dot(u, w @ v)
    return out if b is None else out + b
