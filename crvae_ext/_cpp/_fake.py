"""Fake (meta) kernels of the ``crvae_ext_cpp`` ops, for torch.compile and opcheck.

Imported once the library is loaded: the shapes and dtypes mirror the C++ kernels.
"""

from __future__ import annotations

import torch

from ..reference import accumulate_dtype
from ._build import LIBRARY_NAME


@torch.library.register_fake(f"{LIBRARY_NAME}::groupsort")
def _groupsort(x, group_size, dim):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake(f"{LIBRARY_NAME}::groupsort_backward")
def _groupsort_backward(grad, x, group_size, dim):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake(f"{LIBRARY_NAME}::power_iteration")
def _power_iteration(weight, v, n_iters):
    acc = accumulate_dtype(weight.dtype)
    return (
        weight.new_empty((), dtype=acc),
        weight.new_empty(weight.shape[0], dtype=acc),
        weight.new_empty(weight.shape[1], dtype=acc),
    )


@torch.library.register_fake(f"{LIBRARY_NAME}::lip_linear")
def _lip_linear(x, weight, bias, scale):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake(f"{LIBRARY_NAME}::lip_linear_backward")
def _lip_linear_backward(grad, x, weight, bias, out, scale, u, v, lipschitz, needs):
    need_x, need_w, need_b = needs
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None,
        torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else None,
        weight.new_empty(weight.shape[0]) if need_b and bias is not None else None,
    )
