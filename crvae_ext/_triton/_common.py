"""Shared launch plumbing for the Triton kernels: interpreter mode, CPU delegation, tracing.

Kept apart from the kernels so that each op's file holds only its kernel and launcher.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from types import ModuleType

import torch
import triton
from torch.library import wrap_triton
from torch.utils._python_dispatch import _get_current_dispatch_mode

try:  # private torch API (2.6+): launching without the tracing wrapper saves ~1 ms in eager
    from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton_enabled
except ImportError:
    _set_wrap_triton_enabled = None

from .. import _backend

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


def runs_here(device: torch.device) -> bool:
    """True where the kernels themselves run: CUDA, or any device under the interpreter."""
    return INTERPRETED or device.type == "cuda"


def delegate(device: torch.device) -> ModuleType:
    """The best non-Triton backend for ``device``: the C++ one when built, else the reference."""
    return _backend.kernels(_backend.resolve("auto", device))


def launch(kernel: object, grid: tuple[int, ...]) -> object:
    """``kernel[grid]`` through wrap_triton, so torch.compile and make_fx can trace it."""
    return wrap_triton(kernel)[grid]


@contextlib.contextmanager
def eager_launches(*tensors: torch.Tensor) -> Iterator[None]:
    """Launch kernels directly (no tracing HOP, ~1 ms less) when nothing is being traced.

    triton_op bodies get this from torch already; the LipLinear backward runs inside the
    autograd formula, outside any op, and needs it explicitly.
    """
    plain = all(type(t) is torch.Tensor for t in tensors if t is not None)
    if plain and _set_wrap_triton_enabled is not None and _get_current_dispatch_mode() is None:
        if not torch.compiler.is_compiling():
            with _set_wrap_triton_enabled(False):
                yield
            return
    yield


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
