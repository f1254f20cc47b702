"""The "cpp" backend: C++ (and CUDA) kernels from csrc/, registered as ``crvae_ext_cpp::<op>``.

The library is built or loaded on first use, never at ``import crvae_ext``. If that fails (no
compiler, no ninja, a compile error), one RuntimeWarning says why, ``unusable_reason`` reports
it and the default backend falls back to the torch reference. ``CRVAE_NO_CPP=1`` disables the
backend. The kernel functions have the signatures every backend shares (see reference.py).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from .. import _meta, _torch_private
from . import _build

DISABLE_ENV = "CRVAE_NO_CPP"
ANNOUNCEMENT = (
    "crvae_ext: building the C++ backend for this torch and Python (first use only, about a "
    "minute; 'crvae build' builds it ahead, CRVAE_NO_CPP=1 skips it for the torch reference)\n"
)
_log = logging.getLogger(__name__)
_DIAGNOSTIC = re.compile(r"error|not found|fatal|no such file|permission denied", re.IGNORECASE)


def _summary(exc: BaseException) -> str:
    """One line from an exception whose text can run to pages of compiler output: its first
    line and the first diagnostic (a compiler error, a missing program), at most 300 chars."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    head = lines[0] if lines else ""
    if head.startswith("Error building extension"):
        head = head.split(":", 1)[0]
    diagnostic = next(
        (
            line
            for line in lines[1:]
            if _DIAGNOSTIC.search(line) and not line.startswith(("[", "FAILED", "ninja:"))
        ),
        "",
    )
    text = f"{type(exc).__name__}: {head}" + (f": {diagnostic}" if diagnostic else "")
    return text if len(text) <= 300 else text[:297] + "..."


def _jit_build() -> Path:
    """Build (or reuse the cached build) with CUDA kernels where possible, else CPU only;
    returns the library's path."""
    from torch.utils import cpp_extension

    if torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None:
        try:
            return _build.jit_build(with_cuda=True)
        except Exception as exc:
            _log.debug("CUDA build of csrc failed", exc_info=True)
            warnings.warn(
                f"crvae_ext: the CUDA kernels of the C++ backend failed to build "
                f"({_summary(exc)}); building its CPU kernels only",
                RuntimeWarning,
                stacklevel=3,
            )
    return _build.jit_build(with_cuda=False)


_LOAD_LOCK = threading.Lock()


def _load() -> str | None:
    """Load the library once: None when its ops are registered, else why not (warned once).
    Threads that ask at the same time wait for the one build."""
    with _LOAD_LOCK:
        return _load_once()[0]


@functools.cache
def _load_once() -> tuple[str | None, ModuleType | None]:
    """(why the library is unusable or None, its Python entry points or None)."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return f"disabled by ${DISABLE_ENV}", None
    try:
        path = _build.aot_library()
        if path is not None:
            torch.ops.load_library(str(path))
            name = f"crvae_ext.{_build.AOT_NAME}"
        else:
            if not _build.is_built():
                sys.stderr.write(ANNOUNCEMENT)
                sys.stderr.flush()
            path, name = _jit_build(), _build.LIBRARY_NAME
    except Exception as exc:
        _log.debug("building csrc failed: %s", exc, exc_info=True)
        reason = f"the C++ extension could not be built or loaded ({_summary(exc)})"
        warnings.warn(
            f"crvae_ext: {reason}; the torch reference backend runs instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return reason, None
    _register_fakes()
    return None, _python_entries(Path(path), name)


def _python_entries(path: Path, name: str) -> ModuleType | None:
    """The library's Python module (csrc/python.cpp), loaded from its file; None where that
    fails (torch.ops then serves every call)."""
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception:
        _log.debug("the Python entry points of %s did not load", path, exc_info=True)
        return None


def _register_fakes() -> None:
    """The loaded ops' fake kernels: the same functions as the public ops' (``_meta``)."""
    for name in ("groupsort", "groupsort_backward", "power_iteration", "lip_linear",
                 "lip_linear_backward"):  # fmt: skip
        torch.library.register_fake(f"{_build.LIBRARY_NAME}::{name}", getattr(_meta, name))


def unusable_reason(device_type: str) -> str | None:
    """Why this backend cannot run ``device_type`` tensors, or None; builds on first call."""
    reason = _load()
    if reason is not None:
        return reason
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if _torch_private.has_kernel(f"{_build.LIBRARY_NAME}::groupsort", "CUDA"):
            return None
        return "built without CUDA kernels (they need torch with CUDA and nvcc at build time)"
    return f"no {device_type} kernels"


@functools.cache
def _op(name: str) -> torch._ops.OpOverload:
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"the cpp backend is unusable: {reason}")
    return getattr(getattr(torch.ops, _build.LIBRARY_NAME), name).default


_FORWARDED = ("groupsort", "groupsort_backward", "groupsort_autograd", "lip_linear",
              "lip_linear_autograd", "lip_linear_train")  # fmt: skip


def direct(name: str) -> Callable | None:
    """The op itself for the kernels below that only pass their arguments on to it (Python
    calls less per use), else None."""
    return _torch_private.op_callable(_op(name)) if name in _FORWARDED else None


def entry(name: str) -> Callable | None:
    """The library's Python entry point for op ``name`` (csrc/python.cpp: no per-call parsing of
    the arguments against the schema), else None. It returns None, before any work, where the
    caller's Python path must run: x a tensor subclass, a TorchFunctionMode or a functorch
    transform active (``ops.eager_entry``)."""
    _op(name)  # loads the library (or raises why it cannot)
    return getattr(_load_once()[1], name, None)


def groupsort(x: torch.Tensor, group_size: int, dim: int) -> torch.Tensor:
    """Stable ascending sort in groups of ``group_size`` along ``dim`` (NaN last), contiguous."""
    return _op("groupsort")(x, group_size, dim)


def groupsort_backward(
    grad: torch.Tensor, x: torch.Tensor, group_size: int, dim: int
) -> torch.Tensor:
    """Gradient of ``groupsort``: the order is recomputed from ``x`` (same tie rule)."""
    return _op("groupsort_backward")(grad, x, group_size, dim)


def groupsort_autograd(x: torch.Tensor, group_size: int, dim: int) -> torch.Tensor:
    """``groupsort`` with its autograd node in C++ (csrc/autograd.cpp): the public op's formula,
    for plain eager mode, without a Python node's per-call cost."""
    return _op("groupsort_autograd")(x, group_size, dim)


def power_iteration(
    weight: torch.Tensor, v: torch.Tensor, n_iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma, u, v) after ``n_iters`` steps, one read of W per step, double accumulation."""
    sigma, u, v = _op("power_iteration")(weight, v, n_iters)
    return sigma, u, v


def lip_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor
) -> torch.Tensor:
    """y = scale * (x W^T) + b as one GEMM with alpha = scale."""
    return _op("lip_linear")(x, weight, bias, scale)


def lip_linear_autograd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    lipschitz: float,
) -> torch.Tensor:
    """``lip_linear`` with its autograd node in C++ (csrc/autograd.cpp): the public op's formula,
    for plain eager mode, without a Python node's per-call cost."""
    return _op("lip_linear_autograd")(x, weight, bias, scale, u, v, lipschitz)


def lip_linear_train(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    u: torch.Tensor,
    v: torch.Tensor,
    n_iters: int,
    lipschitz: float,
    sigma_floor: float,
) -> torch.Tensor:
    """LipLinear's training forward in one C++ call (csrc/autograd.cpp, CPU tensors): the power
    iteration from the buffer ``v``, the buffers ``u``, ``v`` updated in place unless sigma is
    0, the scale k / max(sigma, floor), then ``lip_linear_autograd``."""
    return _op("lip_linear_train")(x, weight, bias, u, v, n_iters, lipschitz, sigma_floor)


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
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients w.r.t. (x, W, b) of y = k x W^T / (u^T W v) + b; None where not needed.

    ``out`` (y) may be None when x needs a gradient: <grad, y - b> is then <grad_x, x>.
    """
    needs = tuple(bool(n) for n in needs)
    grads = _op("lip_linear_backward")(
        grad, x, weight, bias, out, scale, u, v, float(lipschitz), list(needs)
    )
    need_b = needs[2] and bias is not None
    return tuple(g if n else None for g, n in zip(grads, (*needs[:2], need_b), strict=True))
