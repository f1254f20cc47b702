"""Every kernel configuration the launchers produce, compiled ahead of time for sm_80 and sm_90
on this (GPU-less) machine: registers, spills, shared memory, and a bytes model per kernel.

Usage: ``python -m benchmarks.ptxas [--full] [--out benchmarks/results/ptxas.md]``; run without
``TRITON_INTERPRET`` (kernels must be compiled, not interpreted). The quick set (one layout per
path, fp32) is what ``tests/test_aot.py`` runs by default; ``--full`` adds every dtype, group
size, layout and GEMM variant.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from crvae_ext._triton import _common, aot
from crvae_ext._triton import groupsort as gs
from crvae_ext._triton import lip_linear as ll
from crvae_ext._triton import power_iteration as pi

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}  # fmt: skip
ARCHS = (80, 90)


@dataclass
class Case:
    """A launcher call on meta tensors, and the bytes the op must move at the least."""

    label: str
    run: Callable[[], object]
    min_bytes: int


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def groupsort_cases(full: bool) -> Iterator[Case]:
    """Forward and backward over layouts: rows (groups along the last dim), NCHW with a small
    and a large inner size, channels-last, a transposed view; network and rank group sizes."""
    m = aot.meta
    layouts = {
        "rows 256x1024": lambda d: (m(256, 1024, dtype=d), 1),
        "nchw 32x64x16x16": lambda d: (m(32, 64, 16, 16, dtype=d), 1),
        "nchw 8x64x4x4": lambda d: (m(8, 64, 4, 4, dtype=d), 1),
    }
    if full:
        layouts |= {
            "channels_last 8x64x16x16": lambda d: (
                m(8, 16, 16, 64, dtype=d).permute(0, 3, 1, 2),
                1,
            ),
            "transposed 1024x256 dim 0": lambda d: (m(256, 1024, dtype=d).t(), 0),
        }
    sizes = (2, 4, 8, 3, 16, 256) if full else (2, 4, 3)
    dtypes = DTYPES if full else {"fp32": torch.float32}
    for (name, make), g, (dname, dtype) in (
        (lm, g, dt) for lm in layouts.items() for g in sizes for dt in dtypes.items()
    ):
        x, dim = make(dtype)
        if x.shape[dim] % g:
            continue
        label = f"groupsort G={g} {name} {dname}"
        yield Case(f"{label} fwd", lambda x=x, g=g, dim=dim: gs._launch(x, None, g, dim),
                   2 * _nbytes(x))  # fmt: skip
        grad = torch.empty_like(x, memory_format=torch.contiguous_format)
        yield Case(f"{label} bwd", lambda x=x, g=g, dim=dim, d=grad: gs._launch(x, d, g, dim),
                   3 * _nbytes(x))  # fmt: skip


def power_iteration_cases(full: bool) -> Iterator[Case]:
    """The one-program path and the persistent row-block path (whole rows, column blocks),
    row- and column-major weights."""
    shapes = [(64, 96), (1024, 1024), (512, 12000)] if full else [(64, 96), (1024, 1024)]
    dtypes = DTYPES if full else {"fp32": torch.float32}
    for (rows, cols), (dname, dtype) in ((s, d) for s in shapes for d in dtypes.items()):
        for major in ("row", "col") if full else ("row",):
            w = aot.meta(rows, cols, dtype=dtype)
            if major == "col":
                w = aot.meta(cols, rows, dtype=dtype).t()
            v = aot.meta(cols)
            label = f"power_iteration {rows}x{cols} {major}-major {dname}"
            yield Case(label, lambda w=w, v=v: pi.power_iteration(w, v, 1), _nbytes(w))


def lip_linear_cases(full: bool) -> Iterator[Case]:
    """Forward and backward, both GEMM variants, with and without bias, TF32 on and off,
    aligned and odd shapes, dense and stride-0 (expanded) upstream gradients."""
    shapes = [(256, 1024, 1024), (100, 300, 77)] if full else [(256, 1024, 1024)]
    dtypes = DTYPES if full else {"fp32": torch.float32}
    gemms = ll.GEMMS
    for (b, n_in, n_out), (dname, dtype), gemm in (
        (s, d, g) for s in shapes for d in dtypes.items() for g in gemms
    ):
        for tf32 in (False, True) if dtype == torch.float32 else (False,):
            for bias in (True, False) if full else (True,):
                for grad_kind in ("dense", "expanded") if full else ("dense",):
                    yield from _lip_linear_case(b, n_in, n_out, dtype, dname, gemm, tf32, bias,
                                                grad_kind)  # fmt: skip


def _lip_linear_case(b, n_in, n_out, dtype, dname, gemm, tf32, bias, grad_kind):
    m = aot.meta
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x, w = m(b, n_in, dtype=dtype), m(n_out, n_in, dtype=dtype)
    bb = m(n_out, dtype=dtype) if bias else None
    scale, u, v = m(dtype=acc), m(n_out, dtype=acc), m(n_in, dtype=acc)
    out = m(b, n_out, dtype=dtype)
    grad = m(1, 1, dtype=dtype).expand(b, n_out) if grad_kind == "expanded" else out
    label = (f"lip_linear B={b} {n_in}->{n_out} {dname} gemm={gemm} tf32={tf32} bias={bias} "
             f"grad={grad_kind}")  # fmt: skip

    def forward():
        with _tf32(tf32):
            ll.lip_linear(x, w, bb, scale, gemm)

    def backward():
        with _tf32(tf32):
            ll.lip_linear_backward(grad, x, w, bb, out, scale, u, v, 1.7, (True, True, True), gemm)

    yield Case(f"{label} fwd", forward, _nbytes(x, w, out))
    yield Case(f"{label} bwd", backward, _nbytes(grad, x, w, x, w))


class _tf32:
    """torch.backends.cuda.matmul.allow_tf32 set for a block (the GEMM's precision follows)."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self) -> None:
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def cases(full: bool) -> list[Case]:
    return [*groupsort_cases(full), *power_iteration_cases(full), *lip_linear_cases(full)]


@dataclass
class Job:
    """One configuration to compile: the launch it came from and its keyword arguments."""

    case: str
    min_bytes: int
    launch: aot.Launch
    kwargs: dict
    grid: tuple[int, ...]
    model_bytes: int  # every tensor argument read or written once


def launch_bytes(launch: aot.Launch) -> int:
    """The bytes model of one launch: each distinct tensor argument moved once (the kernels
    here read each input and write each output once; GEMM tiles re-read from cache)."""
    tensors = {id(a): a for a in launch.args if isinstance(a, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def bytes_model(selected: list[Case]) -> list[tuple[str, int, int, int]]:
    """Per case: (label, launches, modelled bytes over its launches, the op's minimum)."""
    out = []
    for case in selected:
        with aot.recording() as launches:
            case.run()
        out.append((case.label, len(launches), sum(map(launch_bytes, launches)), case.min_bytes))
    return out


def jobs(selected: list[Case]) -> list[Job]:
    """Every configuration the cases launch, deduplicated by kernel and binding."""
    out, seen = [], set()
    for case in selected:
        with aot.recording() as launches:
            case.run()
        for launch in launches:
            for fn, kwargs in aot.expand(launch):
                key = (fn.__name__, _binding_key(launch.args), repr(sorted(kwargs.items())))
                if key in seen:
                    continue
                seen.add(key)
                out.append(Job(case.label, case.min_bytes, launch, kwargs,
                               aot.grid_of(launch, kwargs), launch_bytes(launch)))  # fmt: skip
    return out


def _binding_key(args: tuple) -> tuple:
    """What Triton specialises on: tensor dtypes, int widths and the value 1, floats."""
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append(str(a.dtype))
        elif isinstance(a, bool) or a is None:
            key.append(repr(a))
        elif isinstance(a, int):
            key.append("one" if a == 1 else "i64" if abs(a) >= 2**31 else f"i32:{a % 16 == 0}")
        else:
            key.append(type(a).__name__)
    return tuple(key)


def _compile(job: Job, arch: int) -> aot.Compiled:
    kernel = job.launch.kernel
    fn = kernel.fn if hasattr(kernel, "configs") else kernel
    return aot.compile_config(fn, job.launch.args, job.kwargs, arch)


_JOBS: list[tuple[Job, int]] = []  # the work list, inherited by forked workers


def _run(index: int) -> aot.Compiled:
    job, arch = _JOBS[index]
    result = _compile(job, arch)
    result.hazards = aot.index_hazards(result.ttir)
    result.ttir = ""  # not sent back between processes
    return result


def compile_all(selected: list[Job], archs=ARCHS, workers: int = 2):
    """(job, Compiled) for every job and target, in ``workers`` forked processes (kernels and
    meta tensors do not pickle: workers read the work list they inherit)."""
    if _common.INTERPRETED:
        raise SystemExit("benchmarks.ptxas compiles kernels: run it without TRITON_INTERPRET=1")
    _JOBS[:] = [(job, arch) for job in selected for arch in archs]
    indices = range(len(_JOBS))
    if workers <= 1:
        results = [_run(i) for i in indices]
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(_run, indices, chunksize=1)
    return [(job, r) for (job, _), r in zip(_JOBS, results, strict=True)]


def problems(results) -> list[str]:
    """What fails the sweep: a compile failure, spills, shared memory over the target's limit,
    32-bit index products (``aot.index_hazards``), a grid over CUDA's limits."""
    out = []
    for job, r in results:
        where = f"{r.name} [{job.case}; {r.constants}] sm_{r.arch}"
        if r.error:
            out.append(f"{where}: failed to compile: {r.error}")
            continue
        if r.spills:
            out.append(f"{where}: {r.spill_bytes} B of spills")
        if r.shared_overflow:
            out.append(f"{where}: {r.shared_bytes} B of shared memory")
        out += [f"{where}: 32-bit index product {h}" for h in r.hazards]
        if any(g > limit for g, limit in zip(job.grid, aot.GRID_LIMITS, strict=False)):
            out.append(f"{where}: grid {job.grid} over CUDA's limits")
    return out


def smoke(archs=(90,)) -> int:
    """One configuration of every kernel, compiled for ``archs``: of the full set, the fp32 one
    with the most run-time integers other than 1 (strided layouts: no stride is specialised
    away, so every index product is there). Prints the problems, returns their count (the
    default test suite's check)."""
    best: dict[str, tuple[int, Job]] = {}
    for job in jobs(cases(True)):
        if "fp32" not in job.case:
            continue
        score = sum(type(a) is int and a != 1 for a in job.launch.args)
        name = aot.kernel_name(job.launch)
        if name not in best or score > best[name][0]:
            best[name] = (score, job)
    picked = [job for _, job in best.values()]
    found = problems(compile_all(picked, archs, workers=1))
    print(f"{len(picked)} kernels compiled for {archs}: {len(found)} problems")
    print("\n".join(found))
    return len(found)


def model_table(model: list[tuple[str, int, int, int]]) -> list[str]:
    """The bytes model per case: what its launches move against what the op must move."""
    lines = [
        "",
        "Bytes model per call (every tensor argument of every launch moved once, against the "
        "least the op must move: inputs read once, outputs written once). The cuBLAS variant's "
        "GEMMs (torch.mm) run outside these kernels and are not in its model: its ratio counts "
        "the passes it adds around them.",
        "",
        "| case | kernel launches | modelled MB | minimum MB | modelled / minimum |",
        "|---|---|---|---|---|",
    ]
    for label, launches, modelled, least in model:
        lines.append(f"| {label} | {launches} | {modelled / 1e6:.2f} | {least / 1e6:.2f} | "
                     f"{modelled / least:.2f} |")  # fmt: skip
    return lines


def markdown(results, seconds: float, full: bool, model=None) -> str:
    fails = sum(r.error is not None for _, r in results)
    spills = sum(r.spills for _, r in results)
    overflow = sum(r.shared_overflow for _, r in results)
    hazards = sum(bool(r.hazards) for _, r in results)
    grids = sum(
        any(g > lim for g, lim in zip(j.grid, aot.GRID_LIMITS, strict=False)) for j, _ in results
    )
    lines = [
        f"Triton {aot.triton.__version__}, torch {torch.__version__}; "
        f"{'full' if full else 'quick'} sweep, {len(results)} (configuration, target) pairs "
        f"compiled ahead of time on a CPU in {seconds:.0f} s: {fails} failures, {spills} spilling, "
        f"{overflow} over the shared-memory limit (sm_80 {aot.SHARED_LIMIT[80]} B, "
        f"sm_90 {aot.SHARED_LIMIT[90]} B), {hazards} with 32-bit index products, {grids} grids "
        "over CUDA's limits. Min MB: the bytes the op must move at the least (per launch of the "
        "case it came from); the kernel moves them once when it reads each input once.",
        "",
        "| kernel | case | constants | target | registers | spill B | stack B | shared B | "
        "grid | launch MB (model) | min MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for job, r in results:
        verdict = f"FAILED: {r.error}" if r.error else str(r.registers)
        grid = "x".join(map(str, job.grid))
        lines.append(
            f"| {r.name} | {job.case} | {r.constants} | sm_{r.arch} | {verdict} | "
            f"{r.spill_bytes} | {r.stack_bytes} | {r.shared_bytes} | {grid} | "
            f"{job.model_bytes / 1e6:.2f} | {job.min_bytes / 1e6:.2f} |"
        )
    return "\n".join(lines + (model_table(model) if model else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ptxas", description=__doc__)
    parser.add_argument("--full", action="store_true", help="every dtype, layout and variant")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    chosen = cases(args.full)
    selected = jobs(chosen)
    print(f"{len(selected)} configurations x {len(ARCHS)} targets", file=sys.stderr, flush=True)
    results = compile_all(selected, workers=args.workers)
    text = markdown(results, time.perf_counter() - start, args.full, bytes_model(chosen))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    found = problems(results)
    print(text.split("\n", 1)[0])
    print("\n".join(found))
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
