"""One power-iteration step per backend against two plain matvecs (W v, then W^T t)."""

from __future__ import annotations

import pytest
import torch

from crvae_ext import backends, ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZE = 4096 if DEVICE == "cuda" else 1024
BACKENDS = [b for b in backends(DEVICE) if DEVICE == "cuda" or b != "triton"]


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("kind", ["torch_matvec", *(f"power_iteration_{b}" for b in BACKENDS)])
def test_power_iteration_step(benchmark, kind):
    torch.manual_seed(0)
    w = torch.randn(SIZE, SIZE, device=DEVICE)
    v = torch.randn(SIZE, device=DEVICE)
    if kind == "torch_matvec":
        run = lambda: torch.mv(w.t(), torch.mv(w, v))  # noqa: E731
    else:
        backend = kind.removeprefix("power_iteration_")
        run = lambda: ops.power_iteration(w, v, 1, backend)  # noqa: E731

    def step() -> None:
        run()
        _sync()

    benchmark.group = f"power iteration 1 step {SIZE}x{SIZE} fp32 {DEVICE}"
    benchmark.pedantic(step, rounds=30, warmup_rounds=2, iterations=1)
