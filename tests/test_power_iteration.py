"""power_iteration on every backend against float64 oracles (the reference iteration, exact SVD,
numpy): every dtype, layouts (column-major, padded, aliased rows), every kernel path (one
program, row blocks, tiled rows), empty and zero weights, opcheck, and bad arguments."""

import numpy as np
import pytest
import torch
from helpers import needs_cpp, needs_interpreter
from torch.library import opcheck

import crvae_ext.functional as F
from crvae_ext import _backend, _cpp, ops, reference

if _backend.unusable_reason("triton", "cpu") is None:
    from crvae_ext._triton import kernels
    from crvae_ext._triton import power_iteration as power_iteration_module

    _triton = kernels.cublas

GPU_REASON = _backend.unusable_reason("cpp", "cuda") if torch.cuda.is_available() else "no CUDA"
DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("shape", [(40, 40), (60, 25), (25, 60)])
def test_reference_converges_to_svd(shape):
    w = torch.randn(shape, dtype=torch.float64)
    v = torch.randn(shape[1], dtype=torch.float64)
    sigma, u, v = reference.power_iteration(w, v / v.norm(), 500)
    assert sigma.item() == pytest.approx(np.linalg.norm(w.numpy(), 2), rel=1e-8)
    assert torch.dot(u, w @ v).item() == pytest.approx(sigma.item(), rel=1e-12)


def test_bad_arguments_are_errors():
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match="n_iters must be >= 1"):
        F.power_iteration(w, torch.randn(4), 0)
    with pytest.raises(ValueError, match=r"v must have shape \(4,\)"):
        F.power_iteration(w, torch.randn(3), 1)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        F.power_iteration(torch.randn(3), torch.randn(3), 1)


def test_opcheck_torch():
    w = torch.randn(7, 5)
    opcheck(ops.power_iteration, (w, torch.randn(5), 3, "torch"))


def _lib():
    return torch.ops.crvae_ext_cpp


PI_SHAPES = [(1, 1), (1, 9), (9, 1), (7, 5), (13, 1031), (300, 517), (64, 64), (5, 300)]


@needs_cpp
@pytest.mark.parametrize("n_iters", [1, 3, 25])
@pytest.mark.parametrize("shape", PI_SHAPES, ids=[f"{m}x{n}" for m, n in PI_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cpp_matches_float64_reference(shape, dtype, n_iters):
    w = torch.randn(shape).to(dtype)
    v = torch.randn(shape[1]).to(dtype)
    sigma, u, v_new = _cpp.power_iteration(w, v, n_iters)
    want = reference.power_iteration(w.double(), v.double(), n_iters)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    rtol, atol = (1e-12, 1e-14) if dtype == torch.float64 else (2e-6, 1e-7)
    for got, expected in zip((sigma, u, v_new), want, strict=True):
        assert got.dtype == out_dtype
        torch.testing.assert_close(got, expected.to(out_dtype), rtol=rtol, atol=atol)


def _assert_float64_result(got, want):
    for g, e in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        expected = e.to(g.dtype)  # below float's range the float64 value rounds to 0 too
        assert expected.abs().max() > 0
        torch.testing.assert_close(g, expected, rtol=2e-6, atol=1e-7 * expected.abs().max().item())


@needs_cpp
@pytest.mark.parametrize("magnitude", [1e-15, 1e15, 1e20, 1e30, 1e36])
def test_cpp_float_weight_far_from_one(magnitude):
    """A float weight far from magnitude 1 gives the float64 iteration's result (a kernel that
    formed products in float gave NaN from 1e20 up)."""
    w = (torch.randn(64, 200, dtype=torch.float64) * magnitude).float()
    v = torch.randn(200) * 3  # not a unit vector: the first step's products scale with it
    want = reference.power_iteration(w.double(), v.double(), 3)
    _assert_float64_result(_cpp.power_iteration(w, v, 3), want)


@needs_cpp
@pytest.mark.parametrize("case", ["subnormal_weight", "overflowing_row", "overflowing_column"])
def test_cpp_float_weight_at_the_edges_of_float(case):
    """A subnormal float weight, or one whose sums pass float's maximum while sigma does not
    (16 entries of 5e37 in one lane of a row, or 1e38 down a column of four rows), gives the
    float64 iteration's result: products and sums are formed in double."""
    torch.manual_seed(0)
    v = torch.rand(200, dtype=torch.float64) + 0.5  # one sign: the large entries add up
    if case == "subnormal_weight":
        w = (torch.randn(64, 200, dtype=torch.float64) * 1e-42).float()
        v = v * 1e35
    else:
        w = torch.randn(64, 200) * 1e30
        if case == "overflowing_row":
            w[0, :128:8] = 5e37  # one lane of the 8-wide float sums, one 128-column run
        else:
            w[:4, 7] = 1e38
    want = reference.power_iteration(w.double(), v, 1)
    _assert_float64_result(_cpp.power_iteration(w, v, 1), want)


@needs_cpp
@pytest.mark.parametrize("v_scale", [1e-42, 1e-30, 1e30])
def test_cpp_float_weight_with_v_far_from_unit(v_scale):
    """A float weight with a v far from unit length (a weight with sigma below the 1e-12 clamp
    shrinks v step by step) gives the float64 iteration's result; at 1e-42 the products lie
    below float's range."""
    w = torch.randn(64, 203)
    v = torch.randn(203, dtype=torch.float64) * v_scale
    want = reference.power_iteration(w.double(), v, 1)
    _assert_float64_result(_cpp.power_iteration(w, v.float() if v_scale > 1e-38 else v, 1), want)


@needs_cpp
def test_cpp_layouts_and_zero_weight():
    w = torch.randn(40, 70, dtype=torch.float64)
    v = torch.randn(140, dtype=torch.float64)[::2]  # strided v
    want = reference.power_iteration(w, v, 4)
    column_major = w.t().contiguous().t()
    padded_rows = torch.zeros(40, 140, dtype=torch.float64)[:, :70].copy_(w)
    for weight in (w, column_major, padded_rows):
        for got, expected in zip(_cpp.power_iteration(weight, v, 4), want, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    # rows that alias each other (row stride 0 or < n) are read as the values they show
    expanded = torch.randn(1, 70, dtype=torch.float64).expand(40, 70)
    overlapping = torch.randn(40 * 9 + 70, dtype=torch.float64).as_strided((40, 70), (9, 1))
    column = torch.randn(1, 1, dtype=torch.float64).expand(3, 1)
    for weight in (expanded, overlapping, column):
        vw = v[: weight.shape[1]]
        want = reference.power_iteration(weight.contiguous(), vw, 4)
        for got, expected in zip(_cpp.power_iteration(weight, vw, 4), want, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    zero, v3 = torch.zeros(5, 3), torch.randn(3)
    for got, expected in zip(
        _cpp.power_iteration(zero, v3, 2), reference.power_iteration(zero, v3, 2), strict=True
    ):
        assert torch.equal(got, expected)


@needs_cpp
def test_cpp_converges_to_svd():
    w = torch.randn(60, 45, dtype=torch.float64)
    sigma, u, v = _cpp.power_iteration(w, torch.ones(45, dtype=torch.float64), 2000)
    assert sigma.item() == pytest.approx(reference.spectral_norm_exact(w), rel=1e-10)
    assert torch.dot(u, w @ v).item() == pytest.approx(sigma.item(), rel=1e-12)


@needs_cpp
def test_opcheck_cpp():
    opcheck(_lib().power_iteration.default, (torch.randn(7, 5), torch.randn(5), 3))
    opcheck(ops.power_iteration, (torch.randn(7, 5), torch.randn(5), 3, "cpp"))


@pytest.mark.gpu
@pytest.mark.skipif(GPU_REASON is not None, reason=f"cpp CUDA kernels unusable: {GPU_REASON}")
@pytest.mark.parametrize("shape", [*PI_SHAPES, (4096, 4096)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cpp_cuda_matches_reference(shape, dtype):
    w = torch.randn(shape).to(dtype)
    v = torch.randn(shape[1]).to(dtype)
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    expanded = w[:1].expand(shape)  # aliased rows (row stride 0)
    for weight in (w, expanded):
        got = _cpp.power_iteration(weight.cuda(), v.cuda(), 5)
        want = reference.power_iteration(weight.double().contiguous(), v.double(), 5)
        for g, e in zip(got, want, strict=True):
            torch.testing.assert_close(g.cpu().double(), e, rtol=rtol, atol=rtol)


def _spectral_gap_weight(m, n, top=3.0) -> torch.Tensor:
    """A weight with singular values (top, 1, 0.5, ...): power iteration converges fast."""
    q1, _ = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    s = torch.linspace(1.0, 0.5, min(m, n), dtype=torch.float64)
    s[0] = top
    return (q1[:, : len(s)] * s) @ q2[:, : len(s)].t()


@pytest.fixture(params=["small", "rows-whole", "rows-tiled"])
def power_path(request, monkeypatch):
    """Force each power-iteration path: one program, row blocks in registers, tiled rows."""
    if request.param != "small":  # tiny tiles: several row blocks per program, several programs
        monkeypatch.setattr(power_iteration_module, "SMALL_WEIGHT_BYTES", 0)
        monkeypatch.setattr(power_iteration_module, "ROW_TILE", 128)
    if request.param == "rows-tiled":  # and several column tiles per row
        monkeypatch.setattr(power_iteration_module, "ROW_TILE", 32)
        monkeypatch.setattr(power_iteration_module, "_COL_BLOCK", 8)
    return request.param


@needs_interpreter
@pytest.mark.parametrize("shape", [(7, 5), (37, 20), (20, 70)])
@pytest.mark.parametrize("n_iters", [1, 3])
def test_triton_matches_reference(power_path, shape, n_iters):
    w = torch.randn(shape)
    v = torch.randn(shape[1])
    got = _triton.power_iteration(w, v, n_iters)
    want = reference.power_iteration(w.double(), v.double(), n_iters)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-6)


@needs_interpreter
def test_triton_strided_and_half_weight(power_path):
    w = torch.randn(40, 24).t()  # column-major
    v = torch.randn(80)[::2]
    got = _triton.power_iteration(w, v, 2)
    want = reference.power_iteration(w.double(), v.double(), 2)
    assert all(
        torch.allclose(a.double(), b, rtol=1e-5, atol=1e-6) for a, b in zip(got, want, strict=True)
    )
    half = torch.randn(12, 20).half()
    v0 = torch.randn(20)
    got = _triton.power_iteration(half, v0, 2)
    assert all(t.dtype == torch.float32 for t in got)  # fp32 accumulation and outputs
    want = reference.power_iteration(half.double(), v0.double(), 2)
    assert all(
        torch.allclose(a.double(), b, rtol=1e-5, atol=1e-6) for a, b in zip(got, want, strict=True)
    )


@needs_interpreter
@pytest.mark.parametrize("power_path", ["small", "rows-whole"], indirect=True)
def test_triton_converges_to_svd(power_path):
    w = _spectral_gap_weight(30, 18)
    exact = float(torch.linalg.matrix_norm(w, ord=2))
    sigma, u, v = _triton.power_iteration(w.float(), torch.randn(18), 12)
    assert float(sigma) == pytest.approx(exact, rel=1e-5)
    assert float(torch.dot(u.double(), w @ v.double())) == pytest.approx(exact, rel=1e-5)


@needs_interpreter
def test_triton_zero_weight_gives_zeros(power_path):
    sigma, u, v = _triton.power_iteration(torch.zeros(9, 6), torch.randn(6), 2)
    assert float(sigma) == 0.0 and not u.any() and not v.any()


@needs_interpreter
def test_triton_empty_weight_and_no_steps():
    """Handled by the kernels' launcher itself (it used to hand them to another backend, which
    on CUDA picked triton again: endless recursion)."""
    for shape in ((0, 4), (3, 0)):
        w, v = torch.randn(shape), torch.randn(shape[1])
        for got, want in zip(
            _triton.power_iteration(w, v, 2), reference.power_iteration(w, v, 2), strict=True
        ):
            assert torch.equal(got, want)
    w, v = torch.randn(3, 4), torch.randn(4)
    sigma, u, v_out = _triton.power_iteration(w, v, 0)
    assert float(sigma) == 0 and not u.any() and torch.equal(v_out, v)
    assert v_out.data_ptr() != v.data_ptr()


@needs_interpreter
def test_opcheck_triton():
    opcheck(
        ops.power_iteration,
        (torch.randn(7, 5), torch.randn(5), 3, "triton"),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(48, 40), (1000, 3000), (4096, 4096), (300, 20000)])
def test_triton_cuda_every_dtype(shape, dtype):
    w = torch.randn(shape, device=DEVICE).to(dtype)
    v = torch.randn(shape[1], device=DEVICE)
    got = ops.power_iteration(w, v, 3, "triton")
    want = reference.power_iteration(w.double(), v.double(), 3)
    assert all(t.dtype == (torch.float32) for t in got)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_triton_cuda_converges_to_svd():
    w = torch.randn(700, 300, dtype=torch.float64, device=DEVICE)
    exact = reference.spectral_norm_exact(w)
    sigma, _, _ = ops.power_iteration(w.float(), torch.randn(300, device=DEVICE), 3000, "triton")
    assert float(sigma) == pytest.approx(exact, rel=1e-4)


@pytest.mark.gpu
def test_triton_cuda_opcheck():
    opcheck(ops.power_iteration, (torch.randn(7, 5, device=DEVICE), torch.randn(5, device=DEVICE),
                                  3, "triton"))  # fmt: skip
    opcheck(ops.power_iteration, (torch.randn(300, 200, device=DEVICE),
                                  torch.randn(200, device=DEVICE), 2, "triton"))  # fmt: skip
