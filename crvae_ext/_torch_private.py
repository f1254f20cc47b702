"""Every private torch API the package uses, each behind a guard with a safe fallback.

A torch release that moves one of these costs speed (the conservative fallback), never
correctness. Imports nothing from crvae_ext.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

import torch


def _lookup(path: str) -> Callable | None:
    """The callable at dotted ``path`` below ``torch``, or None where this torch lacks it."""
    target: object = torch
    for part in path.split("."):
        target = getattr(target, part, None)
        if target is None:
            return None
    return target if callable(target) else None


_functorch_active = _lookup("_C._are_functorch_transforms_active")
_has_kernel = _lookup("_C._dispatch_has_kernel_for_dispatch_key")


def functorch_active() -> bool:
    """True under a torch.func transform (vmap, grad, jacrev, ...); True where unknowable, so
    callers take their transform-safe path."""
    return True if _functorch_active is None else bool(_functorch_active())


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether ``op_name`` (e.g. "lib::op") has a kernel for ``dispatch_key``; False where
    unknowable."""
    return False if _has_kernel is None else bool(_has_kernel(op_name, dispatch_key))


def op_callable(overload: Callable) -> Callable:
    """The C++ callable an OpOverload's ``__call__`` forwards to (one Python frame less per
    call); the overload itself where this torch lays it out differently."""
    inner = getattr(overload, "_op", None)
    return inner if callable(inner) else overload


def assume_constant_result(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result`` without its import of torch._dynamo (seconds
    at ``import crvae_ext``): the mark it sets, which tests/test_backend.py checks against it."""
    fn._dynamo_marked_constant = True
    return fn


_FunctionBase = getattr(torch._C, "_FunctionBase", None)
_DIRECT_APPLY = (
    isinstance(_FunctionBase, type)
    and issubclass(torch.autograd.Function, _FunctionBase)
    and callable(getattr(_FunctionBase, "apply", None))
)


def apply_function(function: type[torch.autograd.Function], *args: object) -> object:
    """``function.apply(*args)`` (positional arguments, no functorch transform active) without
    the Python wrapper's per-call binding of default arguments through inspect; the wrapper
    itself where this torch is laid out differently."""
    if _DIRECT_APPLY:
        return super(torch.autograd.Function, function).apply(*args)
    return function.apply(*args)


try:
    from torch.utils._python_dispatch import _get_current_dispatch_mode as _dispatch_mode
except ImportError:
    _dispatch_mode = None

try:
    from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton_enabled
except ImportError:
    _set_wrap_triton_enabled = None


def tracing(*tensors: torch.Tensor | None) -> bool:
    """True where a launch may be traced: compiling, a dispatch mode (fake tensors, make_fx,
    functionalization) or a tensor subclass; True where unknowable."""
    if torch.compiler.is_compiling() or _dispatch_mode is None or _dispatch_mode() is not None:
        return True
    return any(t is not None and type(t) is not torch.Tensor for t in tensors)


@contextlib.contextmanager
def direct_triton_launches(*tensors: torch.Tensor | None) -> Iterator[None]:
    """Let ``wrap_triton(kernel)[grid]`` launch the kernel directly (no tracing wrapper,
    measurably less host time per launch) where nothing can be tracing it."""
    if _set_wrap_triton_enabled is None or tracing(*tensors):
        yield
        return
    with _set_wrap_triton_enabled(False):
        yield


# os.environ decodes keys and values on every lookup (microseconds, per op call here); its
# underlying mapping of encoded names is read directly where CPython lays it out so.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENCODE = getattr(os.environ, "encodekey", None)
_DECODE = getattr(os.environ, "decodevalue", None)


_DIRECT_ENVIRON = isinstance(_ENVIRON_DATA, dict) and callable(_ENCODE) and callable(_DECODE)


@functools.cache
def _encoded(name: str) -> object:
    return _ENCODE(name)


def environ_keys(*names: str) -> tuple:
    """``names`` in the form ``environ_raw`` reads (encoded once where CPython allows)."""
    return tuple(map(_encoded, names)) if _DIRECT_ENVIRON else names


# The raw value of a variable named by a key from environ_keys, None where unset: cheap to read
# and to hash, and equal raw values are equal values.
environ_raw: Callable[[object], object] = _ENVIRON_DATA.get if _DIRECT_ENVIRON else os.environ.get


def environ_decode(raw: object) -> str | None:
    """The value that ``environ_raw`` read, as ``os.environ.get`` gives it."""
    if raw is None or not _DIRECT_ENVIRON:
        return raw
    return _DECODE(raw)


@contextlib.contextmanager
def no_triton_kernel_scan() -> Iterator[None]:
    """Within: ``torch.library.triton_op`` records no kernels found in the op's source (its
    scan imports torch._inductor). Where torch lays this out differently, nothing changes."""
    try:
        from torch._library import triton as module
    except ImportError:
        yield
        return
    original = getattr(module, "get_inner_triton_kernels", None)
    if not callable(original):
        yield
        return
    module.get_inner_triton_kernels = lambda fn: []
    try:
        yield
    finally:
        module.get_inner_triton_kernels = original
