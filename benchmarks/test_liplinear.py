"""LipLinear train step (fwd + bwd + SGD) vs nn.Linear and torch's spectral_norm.

The spectral LipLinear runs once per usable CPU backend (Triton's CPU mode is an interpreter).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import crvae_ext
from crvae_ext import LipLinear

BATCH, WIDTH = 256, 1024
SPECTRAL = [f"liplinear_spectral_{b}" for b in crvae_ext.backends("cpu") if b != "triton"]


def _layer(kind: str, width: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(width, width)
    if kind == "torch_spectral_norm":
        return spectral_norm(nn.Linear(width, width))
    if kind == "liplinear_bjorck":
        return LipLinear(width, width, method="bjorck")
    return LipLinear(width, width, backend=kind.removeprefix("liplinear_spectral_"))


@pytest.mark.parametrize("kind", ["linear", *SPECTRAL, "torch_spectral_norm", "liplinear_bjorck"])
def test_liplinear_train_step(benchmark, kind):
    torch.manual_seed(0)
    layer = _layer(kind, WIDTH)
    x = torch.randn(BATCH, WIDTH)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        layer(x).sum().backward()
        opt.step()

    benchmark.group = f"liplinear train step B={BATCH} {WIDTH}x{WIDTH} fp32"
    rounds = 3 if kind == "liplinear_bjorck" else 30
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)
    assert all(p.grad is not None for p in layer.parameters())
