"""Shared launch plumbing for the Triton kernels: interpreter mode, device checks, tracing.

Kept apart from the kernels so that each op's file holds only its kernel and launcher.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
from torch.library import wrap_triton

# @triton.jit decides at decoration time whether it builds interpreted or compiled kernels.
INTERPRETED = bool(triton.knobs.runtime.interpret)
EPS = 1e-12


def unusable_reason(device_type: str) -> str | None:
    """Why the Triton kernels cannot run ``device_type`` tensors here, or None if they can."""
    interpret_env = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device_type != "cpu":
        return f"the Triton kernels here run CUDA tensors only, not {device_type}"
    if not interpret_env:
        return (
            "Triton runs CPU tensors only through its interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported (slow; meant for tests)"
        )
    if not INTERPRETED:
        return "TRITON_INTERPRET=1 was set after triton was imported; set it before the import"
    return None


def require_device(tensor: torch.Tensor) -> None:
    """Refuse tensors the kernels cannot read: only CUDA ones, or any under the interpreter
    (``_backend.resolve`` never picks this backend for them; this catches direct op calls)."""
    if not (INTERPRETED or tensor.device.type == "cuda"):
        reason = unusable_reason(tensor.device.type)
        raise RuntimeError(f"the triton backend cannot run {tensor.device.type} tensors: {reason}")


def launch(kernel: object, grid: tuple[int, ...]) -> object:
    """``kernel[grid]`` through wrap_triton, so torch.compile and make_fx can trace it (a
    direct launch inside ``_torch_private.direct_triton_launches``)."""
    return wrap_triton(kernel)[grid]


@functools.cache
def num_sms(index: int) -> int:
    """Streaming multiprocessors on CUDA device ``index``."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device) -> int:
    """How many programs a persistent kernel launches: one per SM, a few in the interpreter."""
    if device.type == "cuda" and not INTERPRETED:
        return num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 3


def collapse(shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, int] | None:
    """(size, stride) of dims that one stride can walk, or None where they do not collapse."""
    size, step = 1, 1
    for n, s in reversed(list(zip(shape, stride, strict=True))):
        if n == 1:
            continue
        if size == 1:
            size, step = n, s
        elif s == step * size:
            size *= n
        else:
            return None
    return size, step
