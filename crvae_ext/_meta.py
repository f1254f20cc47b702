"""What every backend agrees on without computing: the accumulation dtype and each op's output
shapes and dtypes (its fake kernel, one per op, registered for the public op and the C++ one).

Imports nothing from crvae_ext, so every backend's kernels can use it.
"""

from __future__ import annotations

import torch

Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 accumulate in fp32; fp32 and fp64 keep their own precision."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def groupsort(x: torch.Tensor, group_size: int, dim: int, *backend: str) -> torch.Tensor:
    """A contiguous tensor like ``x``."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def groupsort_backward(
    grad: torch.Tensor, x: torch.Tensor, group_size: int, dim: int, *backend: str
) -> torch.Tensor:
    """A contiguous tensor like ``x``."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def power_iteration(
    weight: torch.Tensor, v: torch.Tensor, n_iters: int, *backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma, u, v) in the accumulation dtype: a scalar, one entry per row, one per column."""
    acc = accumulate_dtype(weight.dtype)
    return (
        weight.new_empty((), dtype=acc),
        weight.new_empty(weight.shape[0], dtype=acc),
        weight.new_empty(weight.shape[1], dtype=acc),
    )


def lip_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, *rest
) -> torch.Tensor:
    """(rows of x) x (rows of W) in x's dtype."""
    return x.new_empty(x.shape[0], weight.shape[0])


def lip_linear_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None,
    scale: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    lipschitz: float,
    needs: list[bool],
    *backend: str,
) -> Grads:
    """Contiguous (grad_x, grad_W, grad_b), each None where ``needs`` (or a missing bias) says."""
    need_x, need_w, need_b = needs
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None,
        torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else None,
        weight.new_empty(weight.shape[0]) if need_b and bias is not None else None,
    )
