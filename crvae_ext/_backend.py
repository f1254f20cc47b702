"""Backend registry: which kernel implementation runs an op on a device, and why others cannot.

Each backend is a module of kernel functions with one signature per op (``groupsort``,
``groupsort_backward``, ``power_iteration``, ``lip_linear``, ``lip_linear_backward``); the
choice is made here and nowhere else, and no backend's kernels call another backend. "torch" is
the plain-PyTorch reference and is always usable; the others say why they are not, where not.
"triton_gemm" is "triton" with lip_linear's GEMMs in Triton (fused epilogues) instead of cuBLAS.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

import torch

from . import _torch_private

BACKENDS = ("triton", "triton_gemm", "cpp", "torch")
ENV_VAR = "CRVAE_BACKEND"
_TABLES = {  # module, or module:attribute
    "triton": "crvae_ext._triton.kernels:cublas",
    "triton_gemm": "crvae_ext._triton.kernels:triton_gemm",
    "cpp": "crvae_ext._cpp",
    "torch": "crvae_ext.reference",
}
_PREFERENCE = {"cuda": ("triton", "cpp", "torch"), "cpu": ("cpp", "torch")}


@functools.cache
def kernels(name: str) -> Any:
    """The module (or namespace) holding backend ``name``'s kernel functions."""
    module, _, attribute = _TABLES[name].partition(":")
    table = importlib.import_module(module)
    return getattr(table, attribute) if attribute else table


def plain_eager() -> bool:
    """True when nothing compiles or transforms the call: kernels may then run directly."""
    return not (torch.compiler.is_compiling() or _torch_private.functorch_active())


def check_name(backend: object) -> str | None:
    """Validate a ``backend=`` argument at construction time: None, "auto" or a known name."""
    if backend is None or backend == "auto" or backend in BACKENDS:
        return backend
    raise ValueError(f"backend must be None, 'auto' or one of {BACKENDS}, got {backend!r}")


def unusable_reason(name: str, device_type: str) -> str | None:
    """Why backend ``name`` cannot run ``device_type`` tensors here, or None if it can."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {name!r}")
    if name == "torch":
        return None
    return _probe(name, device_type, os.environ.get("TRITON_INTERPRET", "0"))


@functools.cache
def _probe(name: str, device_type: str, _interpret: str) -> str | None:
    """Cached import-and-ask; keyed on TRITON_INTERPRET, which decides Triton's CPU support."""
    try:
        module = kernels(name)
    except ImportError as exc:
        return f"the {name} backend failed to import ({exc})"
    return module.unusable_reason(device_type)


def _device_types() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable on this machine: for ``device``'s type, or for any local device type."""
    types = [torch.device(device).type] if device is not None else _device_types()
    return [b for b in BACKENDS if any(unusable_reason(b, t) is None for t in types)]


@_torch_private.assume_constant_result
def resolve(backend: str | None, device: torch.device) -> str:
    """The concrete backend for a call: the argument, else $CRVAE_BACKEND, else the best usable.

    A forced backend that cannot run on ``device`` is an error, never a silent fallback.
    """
    raw = _torch_private.environ_raw
    return _resolve(backend, device, raw(ENV_KEY), raw(INTERPRET_KEY))


# The variables resolve reads, in the form _torch_private.environ_raw reads.
ENV_KEY, INTERPRET_KEY = _torch_private.environ_keys(ENV_VAR, "TRITON_INTERPRET")


@functools.cache
def _resolve(backend: str | None, device: torch.device, env_raw: object, _interpret: object):
    """``resolve`` for one state of the variables it depends on (keyed on their raw values;
    errors are raised, never cached) and on the device itself, whose hash is cheaper than its
    ``type``."""
    device_type = device.type
    env = _torch_private.environ_decode(env_raw)
    name = backend if backend is not None else (env or "auto")
    if backend is None and name != "auto" and name not in BACKENDS:
        raise ValueError(f"${ENV_VAR} must be 'auto' or one of {BACKENDS}, got {name!r}")
    if name == "auto":
        for candidate in _PREFERENCE.get(device_type, ("torch",)):
            if unusable_reason(candidate, device_type) is None:
                return candidate
    reason = unusable_reason(name, device_type)
    if reason is not None:
        source = "backend" if backend is not None else f"${ENV_VAR}"
        raise RuntimeError(f"{source}={name!r} cannot run {device_type} tensors: {reason}")
    return name
