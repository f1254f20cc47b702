"""GroupSort fwd+bwd against ReLU fwd+bwd on the same tensor, through autograd, per backend."""

from __future__ import annotations

import pytest
import torch

import crvae_ext.functional as F
from crvae_ext import backends

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUMEL = 2**24 if DEVICE == "cuda" else 2**20
WIDTH = 4096
# On CPU the Triton kernels only run in the (slow) interpreter: not a benchmark.
BACKENDS = [b for b in backends(DEVICE) if DEVICE == "cuda" or b != "triton"]


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("group_size", [2, 4])
@pytest.mark.parametrize("kind", ["relu", *(f"groupsort_{b}" for b in BACKENDS)])
def test_groupsort_fwd_bwd(benchmark, kind, group_size):
    torch.manual_seed(0)
    x = torch.randn(NUMEL // WIDTH, WIDTH, device=DEVICE, requires_grad=True)
    grad = torch.randn_like(x)
    if kind == "relu":
        act = torch.relu
    else:
        backend = kind.removeprefix("groupsort_")
        act = lambda t: F.groupsort(t, group_size, 1, backend)  # noqa: E731

    def step() -> None:
        torch.autograd.grad(act(x), x, grad)
        _sync()

    benchmark.group = f"groupsort fwd+bwd g={group_size} {tuple(x.shape)} fp32 {DEVICE}"
    benchmark.pedantic(step, rounds=20, warmup_rounds=2, iterations=1)
