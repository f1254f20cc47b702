"""The custom ops (namespace ``crvae_ext``): schemas, fake kernels and autograd formulas.

Each op takes the concrete backend name as its last argument and forwards to that backend's
kernel of the same name (see ``_backend``). Ops are ``triton_op`` where Triton imports, so that
torch.compile can see the Triton kernels inside; else plain ``custom_op``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _backend, reference

Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]

try:
    import triton  # noqa: F401

    _define = torch.library.triton_op
except Exception:  # a missing or broken triton must never break the import
    _define = torch.library.custom_op


@_define("crvae_ext::groupsort", mutates_args=())
def groupsort(x: torch.Tensor, group_size: int, dim: int, backend: str) -> torch.Tensor:
    """Sort ascending inside consecutive groups of ``group_size`` along ``dim``."""
    return _backend.kernels(backend).groupsort(x, group_size, dim)


@_define("crvae_ext::groupsort_backward", mutates_args=())
def groupsort_backward(
    grad: torch.Tensor, x: torch.Tensor, group_size: int, dim: int, backend: str
) -> torch.Tensor:
    """Gradient of ``groupsort`` w.r.t. its input, recomputing the order from ``x``."""
    return _backend.kernels(backend).groupsort_backward(grad, x, group_size, dim)


@_define("crvae_ext::power_iteration", mutates_args=())
def power_iteration(
    weight: torch.Tensor, v: torch.Tensor, n_iters: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma, u, v) after ``n_iters`` power-iteration steps from the right vector ``v``."""
    return _backend.kernels(backend).power_iteration(weight, v, n_iters)


@_define("crvae_ext::lip_linear", mutates_args=())
def lip_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    lipschitz: float,
    backend: str,
) -> torch.Tensor:
    """y = scale * (x W^T) + b, scale = lipschitz / (u^T W v); u, v enter only the backward."""
    return _backend.kernels(backend).lip_linear(x, weight, bias, scale)


@groupsort.register_fake
def _(x, group_size, dim, backend):
    return x.new_empty(x.shape)


@groupsort_backward.register_fake
def _(grad, x, group_size, dim, backend):
    return x.new_empty(x.shape)


@power_iteration.register_fake
def _(weight, v, n_iters, backend):
    acc = reference.accumulate_dtype(weight.dtype)
    return (
        weight.new_empty((), dtype=acc),
        weight.new_empty(weight.shape[0], dtype=acc),
        weight.new_empty(weight.shape[1], dtype=acc),
    )


@lip_linear.register_fake
def _(x, weight, bias, scale, u, v, lipschitz, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


def _groupsort_setup(ctx, inputs, output) -> None:
    x, group_size, dim, backend = inputs
    ctx.save_for_backward(x)
    ctx.args = (group_size, dim, backend)


def _groupsort_grad(ctx, grad):
    (x,) = ctx.saved_tensors
    return groupsort_backward(grad.contiguous(), x, *ctx.args), None, None, None


groupsort.register_autograd(_groupsort_grad, setup_context=_groupsort_setup)


def _lip_linear_setup(ctx, inputs, output) -> None:
    x, weight, bias, scale, u, v, lipschitz, backend = inputs
    ctx.args = (lipschitz, backend)
    ctx.save_for_backward(x, weight, bias, scale, u, v, output)


def _lip_linear_grad(ctx, grad):
    """Analytic backward with sigma = u^T W v (u, v constant): no normalised copy of W."""
    x, weight, bias, scale, u, v, out = ctx.saved_tensors
    lipschitz, backend = ctx.args
    needs = tuple(ctx.needs_input_grad[:3])
    first_order = _backend.kernels(backend).lip_linear_backward
    grads = lip_linear_grads(first_order, grad, x, weight, bias, out, scale, u, v, lipschitz, needs)
    return *grads, None, None, None, None, None


def lip_linear_grads(
    first_order: Callable[..., Grads],
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None,
    scale: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    lipschitz: float,
    needs: tuple[bool, bool, bool],
) -> Grads:
    """A backend's first-order ``lip_linear_backward``, or under create_graph (grad mode on in a
    backward) gradients that differentiate again; shared by every autograd path of lip_linear."""
    if torch.is_grad_enabled():
        return reference.lip_linear_backward_differentiable(
            grad, x, weight, bias, u, v, lipschitz, needs
        )
    return first_order(grad, x, weight, bias, out, scale, u, v, lipschitz, needs)


lip_linear.register_autograd(_lip_linear_grad, setup_context=_lip_linear_setup)
