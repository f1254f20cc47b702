"""The custom ops (namespace ``crvae_ext``): one schema, one fake kernel and one autograd formula
per op, whichever backend's kernels run it.

Each op takes the concrete backend name as its last argument and runs that backend's kernel of
the same name (see ``_backend``). The ops are ``triton_op`` where Triton imports, so that
torch.compile sees the Triton kernels inside; else plain ``custom_op``. Their fake kernels are
the functions in ``_meta``.

Autograd: each differentiable op has one ``torch.autograd.Function`` (setup_context style, so
functorch's grad/jacrev/vmap work); its ``setup_context`` and ``backward`` are also the op's
registered autograd, which torch.compile and direct op calls use. In plain eager mode the
Function calls the backend kernel directly, skipping the op's Python dispatch, and a backend
may bring its own node for the same formula (``<op>_autograd``: the cpp backend's, in C++).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from . import _backend, _meta, _torch_private
from ._meta import Grads

try:
    import triton  # noqa: F401

    _DEFINE = torch.library.triton_op
except Exception:  # a missing or broken triton must never break the import
    _DEFINE = torch.library.custom_op


def _define(name: str, mutates_args: tuple) -> Callable:
    """``triton_op`` (or ``custom_op``) without its scan of the function's source for Triton
    kernels: ours reach their kernels through the backend table, where the scan finds none,
    and it imports torch._inductor (about a second at ``import crvae_ext``)."""

    def decorate(fn: Callable) -> Any:
        with _torch_private.no_triton_kernel_scan():
            return _DEFINE(name, mutates_args=mutates_args)(fn)

    return decorate


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


_PUBLIC = {
    "groupsort": groupsort,
    "groupsort_backward": groupsort_backward,
    "power_iteration": power_iteration,
    "lip_linear": lip_linear,
}
for _name, _op in _PUBLIC.items():
    _op.register_fake(getattr(_meta, _name))


@functools.cache
def kernel(name: str, backend: str) -> Callable | None:
    """Backend ``backend``'s function ``name`` (or the op it only forwards to, where the backend
    says so: ``direct``), or None where it has none."""
    table = _backend.kernels(backend)
    direct = getattr(table, "direct", None)
    return (direct(name) if direct is not None else None) or getattr(table, name, None)


def call(name: str, backend: str, *args: Any) -> Any:
    """Kernel ``name`` of ``backend`` on the kernel's own arguments: called directly in plain
    eager mode (no op dispatch), else through the public op of the same arguments, so that
    torch.compile, export and functorch see it. ``lip_linear_backward`` has no public op (it
    returns optional tensors); its kernels are traceable as they are."""
    if name not in _PUBLIC or _backend.plain_eager():
        return kernel(name, backend)(*args)
    return _PUBLIC[name](*args, backend)


def _batch_first(t: torch.Tensor, bdim: int | None, size: int) -> torch.Tensor:
    """A vmapped argument with its batch dimension first (expanded where it has none)."""
    return t.movedim(bdim, 0) if bdim is not None else t.expand(size, *t.shape)


class _GroupSortBackward(torch.autograd.Function):
    """groupsort_backward as a node of its own, so that GroupSort has a double backward."""

    @staticmethod
    def forward(grad, x, group_size, dim, backend):
        return call("groupsort_backward", backend, grad, x, group_size, dim)

    @staticmethod
    def vmap(info, in_dims, grad, x, group_size, dim, backend):
        """The batch is one more leading dimension of the same op."""
        grad, x = (
            _batch_first(t, b, info.batch_size) for t, b in zip((grad, x), in_dims[:2], strict=True)
        )
        return _GroupSortBackward.apply(grad, x, group_size, dim + 1, backend), 0

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, x, group_size, dim, _ = inputs
        ctx.save_for_backward(x)
        ctx.args = (group_size, dim)

    @staticmethod
    def backward(ctx, grad_grad_x):
        """grad_x = P^T grad for the sorting permutation P of x, so d/d grad is P itself (a
        gather by x's stable order) and d/dx is 0 (P is locally constant)."""
        (x,) = ctx.saved_tensors
        return _permute_like_groupsort(grad_grad_x, x, *ctx.args), None, None, None, None


def _permute_like_groupsort(t: torch.Tensor, x: torch.Tensor, group_size: int, dim: int):
    """``t`` permuted the way groupsort permutes ``x``: torch.sort(stable=True)'s order, NaN
    last, the permutation every backend's kernels reproduce (differentiable in ``t``)."""
    d = dim % x.dim()
    order = x.unflatten(d, (-1, group_size)).sort(dim=d + 1, stable=True).indices
    return t.unflatten(d, (-1, group_size)).gather(d + 1, order).flatten(d, d + 1)


class _GroupSort(torch.autograd.Function):
    @staticmethod
    def kernel(x, group_size, dim, backend):
        """The backend's kernel on the op's arguments (plain eager mode only)."""
        return kernel("groupsort", backend)(x, group_size, dim)

    @staticmethod
    def forward(x, group_size, dim, backend):
        return call("groupsort", backend, x, group_size, dim)

    @staticmethod
    def vmap(info, in_dims, x, group_size, dim, backend):
        """The batch is one more leading dimension of the same op."""
        x = _batch_first(x, in_dims[0], info.batch_size)
        return _GroupSort.apply(x, group_size, dim + 1, backend), 0

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, group_size, dim, backend = inputs
        ctx.save_for_backward(x)
        ctx.args = (group_size, dim, backend)

    @staticmethod
    def backward(ctx, grad):
        """The gradient routed back through the order recomputed from x (a permutation)."""
        (x,) = ctx.saved_tensors
        group_size, dim, backend = ctx.args
        if torch.is_grad_enabled():  # create_graph: a node that differentiates again
            grad_x = _GroupSortBackward.apply(grad, x, group_size, dim, backend)
        elif _backend.plain_eager():
            if grad.stride(dim) == 0:  # equal along dim (e.g. y.sum()): no permutation moves it
                return grad, None, None, None
            kernel = _backend.kernels(backend).groupsort_backward
            grad_x = kernel(grad.contiguous(), x, group_size, dim)
        else:
            grad_x = groupsort_backward(grad, x, group_size, dim, backend)
        return grad_x, None, None, None


class _LipLinear(torch.autograd.Function):
    @staticmethod
    def kernel(x, weight, bias, scale, u, v, lipschitz, backend):
        """The backend's kernel on the op's arguments (plain eager mode only)."""
        return kernel("lip_linear", backend)(x, weight, bias, scale)

    @staticmethod
    def forward(x, weight, bias, scale, u, v, lipschitz, backend):
        if _backend.plain_eager():
            return _LipLinear.kernel(x, weight, bias, scale, u, v, lipschitz, backend)
        return lip_linear(x, weight, bias, scale, u, v, lipschitz, backend)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, scale, u, v, lipschitz, backend):
        """A batch of inputs only is more rows of one call; batched weights (or scale, u, v)
        are one call per batch entry."""
        if all(b is None for b in in_dims[1:6]):
            rows = _batch_first(x, in_dims[0], info.batch_size)
            out = _LipLinear.apply(rows.flatten(0, 1), weight, bias, scale, u, v, lipschitz,
                                   backend)  # fmt: skip
            return out.unflatten(0, rows.shape[:2]), 0
        args = list(zip((x, weight, bias, scale, u, v), in_dims[:6], strict=True))

        def entry(i: int) -> torch.Tensor:
            picked = (t if b is None or t is None else t.select(b, i) for t, b in args)
            return _LipLinear.apply(*picked, lipschitz, backend)

        return torch.stack([entry(i) for i in range(info.batch_size)]), 0

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, scale, u, v, lipschitz, backend = inputs
        # y enters the backward only when x needs no gradient (else <grad_x, x> stands in)
        kept = None if ctx.needs_input_grad[0] else output
        ctx.save_for_backward(x, weight, bias, scale, u, v, kept)
        ctx.args = (lipschitz, backend)

    @staticmethod
    def backward(ctx, grad):
        """Analytic backward with sigma = u^T W v (u, v constant): no normalised copy of W.
        Under create_graph the gradients are built from the formula so they differentiate."""
        x, weight, bias, scale, u, v, out = ctx.saved_tensors
        lipschitz, backend = ctx.args
        needs = [bool(n) for n in ctx.needs_input_grad[:3]]
        if torch.is_grad_enabled() or _torch_private.functorch_active():
            grads = _lip_linear_grads_differentiable(grad, x, weight, bias, u, v, lipschitz, needs)
        else:
            grads = call("lip_linear_backward", backend, grad, x, weight, bias, out, scale, u, v,
                         lipschitz, needs)  # fmt: skip
        return *grads, None, None, None, None, None


def _lip_linear_grads_differentiable(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    u: torch.Tensor,
    v: torch.Tensor,
    lipschitz: float,
    needs: list[bool],
) -> Grads:
    """The same gradients in closed form with sigma = u^T W v recomputed from W, built from
    differentiable torch ops, so that they differentiate again (gradient penalties,
    Hessian-vector products) and compose with functorch transforms:
    grad_x = s G W, grad_W = s G^T x - (s / sigma) <G, x W^T> u v^T, s = k / sigma."""
    acc = _meta.accumulate_dtype(x.dtype)
    w, g = weight.to(acc), grad.to(acc)
    sigma = torch.dot(u.to(acc), torch.mv(w, v.to(acc)))
    s = lipschitz / sigma
    grad_x = (s * (g @ w)).to(x.dtype) if needs[0] else None
    grad_w = None
    if needs[1]:
        xa = x.to(acc)
        inner = (g * (xa @ w.t())).sum()
        rank1 = torch.outer(u.to(acc), v.to(acc)) * (s / sigma * inner)
        grad_w = (s * (g.t() @ xa) - rank1).to(weight.dtype)
    grad_b = grad.sum(0) if needs[2] and bias is not None else None
    return grad_x, grad_w, grad_b


def _register(op: Any, function: type[torch.autograd.Function]) -> None:
    op.register_autograd(function.backward, setup_context=function.setup_context)


_register(groupsort, _GroupSort)
_register(groupsort_backward, _GroupSortBackward)
_register(lip_linear, _LipLinear)


def _differentiable(function: type[torch.autograd.Function], op: Callable, name: str) -> Callable:
    native_name = f"{name}_autograd"

    def run(*args: Any) -> Any:
        if not _backend.plain_eager():  # compile traces the op and its registered autograd
            return op(*args) if torch.compiler.is_compiling() else function.apply(*args)
        if torch.is_grad_enabled() and any(map(_requires_grad, args)):
            native = kernel(native_name, args[-1])
            if native is not None:  # the backend's own node for this formula (cpp: in C++)
                return native(*args[:-1])
            return _torch_private.apply_function(function, *args)
        return function.kernel(*args)  # no graph to record

    run.__doc__ = (
        "Differentiable op: its one autograd formula; in plain eager mode the kernel itself "
        "when nothing needs a gradient, and the backend's own node for it where it has one."
    )
    return run


def eager_entry(name: str, backend: str) -> Callable | None:
    """The backend's Python entry point for kernel ``name`` where it has one (cpp: the library's
    Python module, csrc/python.cpp), else ``kernel(name, backend)``. Only an entry point returns
    None, before any work, where the caller's Python path must run (x a tensor subclass, a
    TorchFunctionMode or a functorch transform active); callers of a kernel check for those."""
    return _module_entry(name, backend) or kernel(name, backend)


@functools.cache
def _module_entry(name: str, backend: str) -> Callable | None:
    """The backend's Python entry point for ``name``, or None where it has none."""
    entry = getattr(_backend.kernels(backend), "entry", None)
    return entry(name) if entry is not None else None


@functools.cache
def resolved_entry(
    name: str, backend: str | None, device: torch.device, _env: object, _interpret: object
) -> Callable | None:
    """The Python entry point for ``name`` of the backend ``_backend.resolve`` picks, or None
    where it has none (no kernel stands in: the caller's Python path checks what an entry
    point checks). Cached per state of the variables resolve reads, passed in as their raw
    values (``_backend.ENV_KEY``, ``INTERPRET_KEY``); errors are raised, never cached."""
    return _module_entry(name, _backend.resolve(backend, device))


def _requires_grad(arg: Any) -> bool:
    return isinstance(arg, torch.Tensor) and arg.requires_grad


groupsort_autograd = _differentiable(_GroupSort, groupsort, "groupsort")
lip_linear_autograd = _differentiable(_LipLinear, lip_linear, "lip_linear")
