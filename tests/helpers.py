"""Test helpers shared across files (independent of the code under test)."""

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from crvae_ext import _backend

CPP_REASON = _backend.unusable_reason("cpp", "cpu")
needs_cpp = pytest.mark.skipif(CPP_REASON is not None, reason=f"cpp backend unusable: {CPP_REASON}")
INTERPRETER_REASON = _backend.unusable_reason("triton", "cpu")
needs_interpreter = pytest.mark.skipif(
    INTERPRETER_REASON is not None, reason=f"Triton interpreter unavailable: {INTERPRETER_REASON}"
)
# (rtol, atol) against a float64 oracle, per dtype; fp32 GEMMs may use TF32 only where torch is
# told to (allow_tf32 is off by default), so fp32 is held to fp32 accuracy.
TOLERANCE = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


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
        x.grad, y.grad = torch.autograd.grad(-ratio.sum(), (x, y))  # no weight gradients
        opt.step()
    return best


def naive_lip_linear(x, w, b, u, v, k):
    """k x W^T / (u^T W v) + b in plain autograd: the formula LipLinear's backward must match."""
    out = k * (x @ w.t()) / torch.dot(u, w @ v)
    return out if b is None else out + b


@contextlib.contextmanager
def num_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` within, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_split(batch: int, columns: int, threads: int, kind: str) -> None:
    """The cpp kernels split a GEMM of ``batch`` rows and ``columns`` output columns into
    ``threads`` parts by ``kind`` (csrc/gemm_split.h; not at all on one thread or without MKL):
    a test's shape takes the split it means to test. Call it under ``num_threads(threads)``."""
    from crvae_ext import _cpp

    plan = _cpp._load_once()[1].split_plan(batch, columns)
    if threads == 1 or not torch.backends.mkl.is_available():
        assert plan[0] == 1, plan
    else:
        assert plan == (threads, kind), plan
