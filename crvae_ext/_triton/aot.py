"""Ahead-of-time compilation of the kernels for real GPU targets, on any machine (no GPU).

The launchers run on ``meta`` tensors with their launches recorded instead of made
(``recording``); each recorded launch is bound exactly as Triton binds a real one (argument
types, integer widths, alignment specialisations, the autotuner's configs), compiled for a
``GPUTarget`` and its cubin's resources read with the ptxas that Triton itself uses. Needs
triton imported in compiled mode (no ``TRITON_INTERPRET``): run it in its own process
(``python -m benchmarks.ptxas``, ``tests/test_aot.py``).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from . import _common

# Per-block shared memory a kernel may use (bytes): the opt-in maxima of the architectures.
SHARED_LIMIT = {80: 166912, 90: 232448}
# CUDA's grid limits: x < 2^31, y and z <= 65535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)
SMS = 132  # persistent kernels size their grids by the SM count: an H100/H200's


@dataclass
class Launch:
    """One recorded launch: the kernel (or autotuner), its grid and its arguments."""

    kernel: Any
    grid: Any
    args: tuple
    kwargs: dict


@dataclass
class Compiled:
    """A compiled kernel configuration and its resources on one target."""

    name: str
    arch: int
    signature: str
    constants: str
    registers: int = 0
    spill_bytes: int = 0  # spill stores + loads
    stack_bytes: int = 0
    shared_bytes: int = 0
    ttir: str = field(default="", repr=False)
    hazards: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def spills(self) -> bool:
        return self.spill_bytes > 0

    @property
    def shared_overflow(self) -> bool:
        return self.shared_bytes > SHARED_LIMIT[self.arch]


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Run launchers with every ``_common.launch`` recorded instead of made; the device checks
    accept meta tensors and persistent grids assume ``SMS`` SMs."""
    launches: list[Launch] = []

    def record(kernel, grid):
        def call(*args, **kwargs):
            launches.append(Launch(kernel, grid, args, kwargs))

        return call

    with (
        mock.patch.object(_common, "launch", record),
        mock.patch.object(_common, "require_device", lambda tensor: None),
        mock.patch.object(_common, "persistent_programs", lambda device: SMS),
        mock.patch.object(_common, "INTERPRETED", False),
    ):
        yield launches


def expand(launch: Launch) -> list[tuple[JITFunction, dict]]:
    """(kernel, keyword arguments) per configuration a launch can run: the autotuner's
    configs (with their warps and stages) or the launch itself."""
    kernel = launch.kernel
    configs = getattr(kernel, "configs", None)  # an autotuner's
    if configs is None:
        return [(kernel, dict(launch.kwargs))]
    return [(kernel.fn, {**launch.kwargs, **config.all_kwargs()}) for config in configs]


def kernel_name(launch: Launch) -> str:
    """The name of the kernel a launch runs (through an autotuner too)."""
    kernel = launch.kernel
    return (kernel.fn if hasattr(kernel, "configs") else kernel).__name__


def grid_of(launch: Launch, kwargs: dict) -> tuple[int, ...]:
    """The launch grid (a callable grid evaluated on the configuration's meta-parameters)."""
    grid = launch.grid
    if callable(grid):
        kernel = launch.kernel
        names = (kernel.fn if hasattr(kernel, "configs") else kernel).arg_names
        bound = dict(zip(names, launch.args, strict=False)) | kwargs
        grid = grid(bound)
    return tuple(int(g) for g in grid)


def _bind(fn: JITFunction, args: tuple, kwargs: dict, target: GPUTarget):
    """Triton's own binding of a launch: (signature, constexprs, attrs, options)."""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound, specialization, options
    )
    return signature, constexprs, attrs, options


def _ptxas_stats(ptx: str, arch: int) -> dict[str, int]:
    """Registers, spill bytes and stack frame of ``ptx`` by ``ptxas -v`` (Triton's ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        suffix = "a" if arch >= 90 else ""
        done = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o", str(Path(tmp) / "k")],
            capture_output=True,
            text=True,
            check=True,
        )
    text = done.stderr

    def number(pattern: str) -> int:
        return sum(int(m) for m in re.findall(pattern, text))

    return {
        "registers": max((int(m) for m in re.findall(r"Used (\d+) registers", text)), default=0),
        "spill_bytes": number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
        "stack_bytes": number(r"(\d+) bytes stack frame"),
    }


def compile_config(fn: JITFunction, args: tuple, kwargs: dict, arch: int) -> Compiled:
    """Compile one configuration for sm_``arch`` and read its resources."""
    target = GPUTarget("cuda", arch, 32)
    signature, constexprs, attrs, options = _bind(fn, args, kwargs, target)
    sig_text = ", ".join(f"{k}: {v}" for k, v in signature.items() if v != "constexpr")
    const_text = ", ".join(f"{fn.arg_names[k[0]]}={v}" for k, v in constexprs.items())
    extra = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
    const_text += "".join(f", {k}={v}" for k, v in extra.items())
    out = Compiled(fn.__name__, arch, sig_text, const_text)
    try:
        kernel = triton.compile(
            ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
        )
    except Exception as exc:  # reported per configuration
        out.error = " ".join(str(exc).split())[:300]
        return out
    out.shared_bytes = int(kernel.metadata.shared)
    out.ttir = kernel.asm["ttir"]
    for key, value in _ptxas_stats(kernel.asm["ptx"], arch).items():
        setattr(out, key, value)
    return out


_SSA = re.compile(r"^\s*(%[\w.#]+)(?::\d+)? = ([\w.]+)\s*(.*)$")


def index_hazards(ttir: str) -> list[str]:
    """32-bit products in a kernel's TTIR that can pass 2^31 on big tensors: of two run-time
    values (an index times a stride), or of a size-like value (a 32-bit kernel argument, or a
    sum, difference or product with one) by anything, constants included (``n_rows * G``).
    A block offset (``program_id * B``) is not one: the grid holds it already."""
    header = next((line for line in ttir.splitlines() if "tt.func" in line), "")
    sizes = set(re.findall(r"(%[\w.#]+): i32\b", header))
    constant: set[str] = set()
    hazards = []
    for line in ttir.splitlines():
        match = _SSA.match(line)
        if not match:
            continue
        name, op, rest = match.groups()
        operands = re.findall(r"%[\w.#]+", rest.split(":")[0])
        i32 = bool(re.search(r":\s*(tensor<[^>]*x)?i32\b", rest.split(" loc(")[0]))
        if op == "arith.constant" or (
            op in ("tt.splat", "tt.broadcast", "tt.expand_dims") and set(operands) <= constant
        ):
            constant.add(name)
            continue
        sized = any(o in sizes for o in operands)
        if op == "arith.muli" and i32 and (sized or not any(o in constant for o in operands)):
            hazards.append(line.strip().split(" loc(")[0])
        if i32 and sized and op in _SIZE_OPS:
            sizes.add(name)
    return hazards


_SIZE_OPS = ("arith.addi", "arith.subi", "arith.muli", "tt.splat", "tt.broadcast",
             "tt.expand_dims")  # fmt: skip


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor with a shape and no storage, for the launchers' arithmetic."""
    return torch.empty(shape, dtype=dtype, device="meta")
