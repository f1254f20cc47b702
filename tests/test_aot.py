"""GPU readiness without a GPU: the kernels compiled ahead of time for sm_90 (a subprocess, as
Triton must compile rather than interpret), and the launchers' grids, integer widths and
scalar arguments on tensors too big to allocate (recorded on ``meta`` tensors)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import needs_interpreter

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton")

from crvae_ext._triton import aot  # noqa: E402
from crvae_ext._triton import groupsort as gs  # noqa: E402
from crvae_ext._triton import lip_linear as ll  # noqa: E402
from crvae_ext._triton import power_iteration as pi  # noqa: E402

BIG = 2**31 + 2**20  # elements: past what a 32-bit index holds


def _record(run) -> list[aot.Launch]:
    with aot.recording() as launches:
        run()
    return launches


def _grids(launches: list[aot.Launch]) -> list[tuple[int, ...]]:
    return [aot.grid_of(la, kw) for la in launches for _, kw in aot.expand(la)]


def _within_cuda_limits(grid: tuple[int, ...]) -> bool:
    return all(1 <= g <= limit for g, limit in zip(grid, aot.GRID_LIMITS, strict=False))


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_without_spills_or_hazards():
    """One configuration of each kernel, compiled for sm_90 in a process without the
    interpreter: it compiles, has no spills, fits the shared memory, and no 32-bit product of
    two run-time values enters its index arithmetic (``aot.index_hazards``). The full sweep
    (every config, sm_80 and sm_90): ``CRVAE_AOT_FULL=1`` here, or
    ``python -m benchmarks.ptxas --full``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import sys; from benchmarks.ptxas import smoke; sys.exit(smoke())"
    if os.environ.get("CRVAE_AOT_FULL") == "1":  # the full sweep, every config on both targets
        code = "import sys; from benchmarks.ptxas import main; sys.exit(main(['--full']))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "0 problems" in done.stdout or "0 failures, 0 spilling, 0 over" in done.stdout


def test_index_hazards_flags_a_32_bit_index_times_stride():
    ttir = """
    %c = arith.constant 8 : i32 loc(#loc)
    %r = tt.make_range {end = 16 : i32, start = 0 : i32} : tensor<16xi32> loc(#loc1)
    %s = tt.splat %stride : i32 -> tensor<16xi32> loc(#loc2)
    %bad = arith.muli %r, %s : tensor<16xi32> loc(#loc3)
    %cs = tt.splat %c : i32 -> tensor<16xi32> loc(#loc4)
    %fine = arith.muli %r, %cs : tensor<16xi32> loc(#loc5)
    %wide = arith.muli %a, %b : tensor<16xi64> loc(#loc6)
    """
    assert aot.index_hazards(ttir) == ["%bad = arith.muli %r, %s : tensor<16xi32>"]


@pytest.mark.parametrize(
    ("shape", "dim", "group_size"),
    [
        ((1, 2, BIG // 2), 1, 2),  # blocked: one row group, 2^30 inner positions
        ((BIG // 4, 4), 1, 4),  # flat: groups along the last dim
        ((2, 6, BIG // 12), 1, 3),  # rank path over a huge inner size
    ],
)
def test_groupsort_grids_fit_cuda_on_huge_tensors(shape, dim, group_size):
    x = aot.meta(*shape)
    for grad in (None, x):
        launches = _record(lambda g=grad: gs._launch(x, g, group_size, dim))
        assert launches and all(_within_cuda_limits(g) for g in _grids(launches))


def test_power_iteration_and_lip_linear_grids_fit_cuda_on_huge_tensors():
    w = aot.meta(2**16, 2**15 + 8).t()  # column-major, past 2^31 elements
    launches = _record(lambda: pi.power_iteration(w, aot.meta(w.shape[1]), 2))
    x, weight = aot.meta(2**17, 2**14 + 8), aot.meta(2**17 + 8, 2**14 + 8)
    scale, u, v = aot.meta(), aot.meta(weight.shape[0]), aot.meta(weight.shape[1])
    out = aot.meta(x.shape[0], weight.shape[0])
    for gemm in ll.GEMMS:
        launches += _record(lambda g=gemm: ll.lip_linear(x, weight, None, scale, g))
        launches += _record(
            lambda g=gemm: ll.lip_linear_backward(
                out, x, weight, None, out, scale, u, v, 1.7, (True, True, False), g
            )
        )
    assert all(_within_cuda_limits(g) for g in _grids(launches))


def test_no_kernel_takes_a_float_scalar():
    """Float arguments are fp32 when compiled but Python floats in the interpreter: scalars
    reach the kernels as tensors in the accumulation dtype, or as constexprs (exact there)."""
    from benchmarks.ptxas import cases

    for case in cases(full=True):
        for launch in _record(case.run):
            floats = [a for a in launch.args if isinstance(a, float)]
            assert not floats, f"{case.label}: float arguments {floats}"


@pytest.mark.parametrize("gemm", ["triton", "triton_gemm"])
def test_empty_inputs_launch_nothing_and_never_redispatch(gemm, monkeypatch):
    """CUDA dispatch logic on meta tensors: empty problems return before any launch and never
    hand the work to another backend (which on CUDA would be this one again)."""
    from crvae_ext import _backend

    def refuse(*args, **kwargs):
        raise AssertionError("re-dispatched")

    monkeypatch.setattr(_backend, "resolve", refuse)
    table = _backend.kernels(gemm)
    with aot.recording() as launches:
        sigma, u, v = table.power_iteration(aot.meta(0, 5), aot.meta(5), 3)
        assert sigma.shape == () and u.shape == (0,) and v.shape == (5,)
        table.groupsort(aot.meta(0, 8), 2, 1)
        table.groupsort_backward(aot.meta(0, 8), aot.meta(0, 8), 4, 1)
    assert launches == []
    with aot.recording() as launches:
        table.lip_linear(
            aot.meta(0, 4),
            aot.meta(3, 4),
            None,
            aot.meta(),
        )
    assert all(0 in aot.grid_of(la, kw) for la in launches for _, kw in aot.expand(la))


def test_fp32_without_tf32_takes_cublas_in_triton_gemm():
    """An IEEE fp32 Triton GEMM has no tensor cores (it spills and trails cuBLAS): the
    "triton_gemm" backend runs it through torch.mm unless TF32 is allowed."""
    x, w, scale = aot.meta(64, 32), aot.meta(16, 32), aot.meta()
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        for tf32, fused in ((False, False), (True, True)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            launches = _record(lambda: ll.lip_linear(x, w, None, scale, "triton"))
            names = {aot.kernel_name(la) for la in launches}
            assert ("_lip_linear_matmul_kernel" in names) is fused
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@needs_interpreter
def test_fp64_backward_with_k_not_a_power_of_two_matches_the_reference():
    """scale / k reaches the kernels as an fp64 tensor: the fp64 Triton backward agrees with
    the float64 reference to rounding, for k = 1.7."""
    from crvae_ext import _backend, reference

    torch.manual_seed(0)
    x, w = torch.randn(9, 12, dtype=torch.float64), torch.randn(10, 12, dtype=torch.float64)
    b = torch.randn(10, dtype=torch.float64)
    sigma, u, v = reference.power_iteration(w, torch.randn(12, dtype=torch.float64), 30)
    scale = 1.7 / sigma
    out = reference.lip_linear(x, w, b, scale)
    grad = torch.randn_like(out)
    for needs in ((True, True, True), (False, True, False)):
        want = reference.lip_linear_backward(grad, x, w, b, out, scale, u, v, 1.7, needs)
        got = _backend.kernels("triton").lip_linear_backward(grad, x, w, b, out, scale, u, v,
                                                              1.7, needs)  # fmt: skip
        for g, e in zip(got, want, strict=True):
            assert (g is None) == (e is None)
            if g is not None:
                torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_gemm_routing_follows_torchs_tf32_api_and_operand_alignment():
    """torch's new TF32 setting (``fp32_precision``, under which reading the legacy flag
    raises) is honoured; offset views, expanded and odd operands take cuBLAS."""
    matmul = torch.backends.cuda.matmul
    x, w = aot.meta(64, 32), aot.meta(16, 32)
    try:
        matmul.fp32_precision = "tf32"
        assert ll._gemm_variant("triton", x, w) == "triton"
        assert ll._gemm_variant("cublas", x, w) == "cublas"
        offset = aot.meta(64, 48)[:, 1:33]  # 4-byte aligned data: no vector loads
        expanded = aot.meta(1, 32).expand(64, 32)
        odd = aot.meta(60, 32)
        for a in (offset, expanded, odd):
            assert ll._gemm_variant("triton", a, w) == "cublas"
        matmul.fp32_precision = "ieee"
        assert ll._gemm_variant("triton", x, w) == "cublas"
        assert ll._gemm_variant("triton", x.half(), w.half()) == "triton"
    finally:
        matmul.fp32_precision = "none"
