"""Eager fast path of the cpp backend: its ``crvae_ext_cpp`` ops called directly.

A forward + backward through the public ``crvae_ext::`` custom ops costs about 0.25 ms of
Python dispatch on this 2-core CPU (the custom_op/triton_op wrappers, forward and backward),
more than GroupSort's whole kernel time at 256 x 1024. functional.py takes this path in eager
mode only; torch.compile, export and functorch transforms keep going through the public ops,
which run the same kernels. groupsort is differentiable through its C++ autograd kernel,
lip_linear through a plain autograd Function (its step is milliseconds, Python is noise there).
"""

from __future__ import annotations

import torch

from ..ops import lip_linear_grads
from . import _op, groupsort, lip_linear_backward, power_iteration

# groupsort and power_iteration are the backend's own calls; only lip_linear needs a Function here
__all__ = ["groupsort", "lip_linear", "power_iteration"]


class _LipLinear(torch.autograd.Function):
    """Classic-style Function: the setup_context style binds arguments with inspect per call."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, u, v, lipschitz: float) -> torch.Tensor:
        out = _op("lip_linear")(x, weight, bias, scale)
        # y enters the backward only when x needs no gradient (else <grad_x, x> stands in)
        kept = None if ctx.needs_input_grad[0] else out
        ctx.save_for_backward(x, weight, bias, scale, u, v, kept)
        ctx.lipschitz = lipschitz
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, bias, scale, u, v, out = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        grads = lip_linear_grads(
            lip_linear_backward, grad, x, weight, bias, out, scale, u, v, ctx.lipschitz, needs
        )
        return *grads, None, None, None, None


def lip_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    lipschitz: float,
) -> torch.Tensor:
    """Differentiable y = scale * (x W^T) + b with the analytic backward (eager only)."""
    return _LipLinear.apply(x, weight, bias, scale, u, v, lipschitz)
