"""Triton kernels under TRITON_INTERPRET=1 (CPU) against independent oracles, fp32, tiny shapes.

Oracles: torch.sort (through reference.groupsort), float64 SVD, the reference power iteration
and autograd of the naive LipLinear formula in float64. Skipped where the interpreter is off
(GPU machines run tests/test_triton_gpu.py instead).
"""

import os

import pytest
import torch
from helpers import naive_lip_linear
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.library import opcheck

import crvae_ext.functional as F
from crvae_ext import GroupSort, LipLinear, _backend, ops, reference

pytestmark = pytest.mark.skipif(
    _backend.unusable_reason("triton", "cpu") is not None,
    reason=f"Triton interpreter unavailable: {_backend.unusable_reason('triton', 'cpu')}",
)

if _backend.unusable_reason("triton", "cpu") is None:
    from crvae_ext._triton import _common, kernels
    from crvae_ext._triton import groupsort as groupsort_module
    from crvae_ext._triton import power_iteration as power_iteration_module

    _triton = kernels.cublas

GROUP_SIZES = [2, 4, 8, 3, 5, 6, 16]
# opcheck's AOT-dispatch test cannot trace interpreted kernels (FakeTensor data pointers);
# tests/test_triton_gpu.py runs the full opcheck on CUDA.
OPCHECK_CPU = ("test_schema", "test_autograd_registration", "test_faketensor")


def _tied(shape, dtype=torch.float32) -> torch.Tensor:
    """Few distinct values, signed zeros and NaNs: ties must keep their order (stable sort)."""
    x = torch.randint(-2, 3, shape).to(dtype)
    flat = x.view(-1)
    flat[::5] = -0.0
    flat[3::7] = float("nan")
    return x


def _bits(x: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that -0.0 vs 0.0 and NaN compare exactly."""
    return x.contiguous().view(torch.int32 if x.dtype == torch.float32 else torch.int64)


def _check_groupsort(x: torch.Tensor, group_size: int, dim: int) -> None:
    out = _triton.groupsort(x, group_size, dim)
    assert out.is_contiguous()
    assert torch.equal(_bits(out), _bits(reference.groupsort(x, group_size, dim)))
    grad = torch.randn(x.shape)
    got = _triton.groupsort_backward(grad, x, group_size, dim)
    assert torch.equal(got, reference.groupsort_backward(grad, x, group_size, dim))


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize(
    ("make_shape", "dim", "blocked"),
    [
        (lambda g: (5, 3 * g), 1, False),
        (lambda g: (3, 3 * g, 5), 1, False),
        (lambda g: (2, 2 * g, 5), 1, True),
        (lambda g: (3 * g, 3), 0, False),
    ],
    ids=["last-dim", "inner>1", "inner>1-blocked", "dim0"],
)
def test_groupsort_matches_torch_sort(make_shape, dim, blocked, group_size, monkeypatch):
    if blocked:  # 2-D programs over inner positions (large inner dims) on a small shape
        monkeypatch.setattr(groupsort_module, "BLOCKED_INNER", 4)
    shape = make_shape(group_size)
    x = torch.randn(shape)
    x.view(-1)[1::2] = x.view(-1)[::2][: x.numel() // 2]  # exact ties between neighbours
    _check_groupsort(x, group_size, dim)
    _check_groupsort(_tied(shape), group_size, dim)


@pytest.mark.parametrize(
    ("make", "dim"),
    [
        (lambda t: t[:, ::2], 1),  # strided channels, read in place
        (lambda t: t.t(), 0),  # column-major, groups along the unit-stride dim
        (lambda t: t.t(), 1),  # column-major, groups along the strided dim
        (lambda t: t.reshape(2, 3, 2, 48)[:, :, 1:].permute(0, 3, 1, 2), 1),  # cannot collapse
    ],
    ids=["strided", "transposed-dim0", "transposed-dim1", "permuted"],
)
@pytest.mark.parametrize("group_size", [2, 4, 8, 3])
def test_groupsort_strided_inputs(make, dim, group_size):
    x = make(_tied((12, 48)))
    if x.shape[dim] % group_size:
        pytest.skip("group size does not divide this layout")
    assert not x.is_contiguous()
    _check_groupsort(x, group_size, dim)


def test_groupsort_fp64_and_full_sort():
    _check_groupsort(torch.randn(3, 40, dtype=torch.float64), 40, 1)
    _check_groupsort(torch.randn(4, 8, dtype=torch.float64), 8, 1)


def test_collapse_finds_single_strides():
    assert _common.collapse((3, 4), (4, 1)) == (12, 1)
    assert _common.collapse((3, 4), (8, 2)) == (12, 2)
    assert _common.collapse((3, 4), (1, 3)) is None
    assert _common.collapse((3, 1, 4), (4, 99, 1)) == (12, 1)
    assert _common.collapse((), ()) == (1, 1)


@settings(max_examples=15, deadline=None)
@given(
    outer=st.integers(1, 4),
    groups=st.integers(1, 4),
    inner=st.integers(1, 3),
    group_size=st.sampled_from([2, 3, 4, 5, 8]),
    step=st.sampled_from([1, 2]),
)
def test_groupsort_property_over_shapes(outer, groups, inner, group_size, step):
    base = _tied((outer, groups * group_size * step, inner))
    _check_groupsort(base[:, ::step], group_size, 1)


@pytest.mark.parametrize("group_size", [2, 4, 3])
def test_groupsort_autograd_through_the_op(group_size):
    x = torch.randn(4, 12, 3, requires_grad=True)
    out = GroupSort(group_size, dim=1, backend="triton")(x)
    expected = x.unflatten(1, (-1, group_size)).sort(dim=2).values.flatten(1, 2)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(expected, x, grad)
    assert torch.equal(got, want)


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
        monkeypatch.setattr(power_iteration_module, "SMALL_WEIGHT", 0)
        monkeypatch.setattr(power_iteration_module, "ROW_TILE", 128)
    if request.param == "rows-tiled":  # and several column tiles per row
        monkeypatch.setattr(power_iteration_module, "ROW_TILE", 32)
        monkeypatch.setattr(power_iteration_module, "_COL_BLOCK", 8)
    return request.param


@pytest.mark.parametrize("shape", [(7, 5), (37, 20), (20, 70)])
@pytest.mark.parametrize("n_iters", [1, 3])
def test_power_iteration_matches_reference(power_path, shape, n_iters):
    w = torch.randn(shape)
    v = torch.randn(shape[1])
    got = _triton.power_iteration(w, v, n_iters)
    want = reference.power_iteration(w.double(), v.double(), n_iters)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-6)


def test_power_iteration_strided_and_half_weight(power_path):
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


@pytest.mark.parametrize("power_path", ["small", "rows-whole"], indirect=True)
def test_power_iteration_converges_to_svd(power_path):
    w = _spectral_gap_weight(30, 18)
    exact = float(torch.linalg.matrix_norm(w, ord=2))
    sigma, u, v = _triton.power_iteration(w.float(), torch.randn(18), 12)
    assert float(sigma) == pytest.approx(exact, rel=1e-5)
    assert float(torch.dot(u.double(), w @ v.double())) == pytest.approx(exact, rel=1e-5)


def test_power_iteration_zero_weight_gives_zeros(power_path):
    sigma, u, v = _triton.power_iteration(torch.zeros(9, 6), torch.randn(6), 2)
    assert float(sigma) == 0.0 and not u.any() and not v.any()


@pytest.fixture(params=["triton", "triton_gemm"])
def gemm(request):
    """Both LipLinear GEMM variants: torch.mm + fused epilogues ("triton"), Triton GEMMs with
    fused epilogues ("triton_gemm"); the value is the backend name."""
    return request.param


def _lip_problem(batch, n, m, bias, dtype=torch.float32):
    w = torch.randn(m, n, dtype=dtype)
    sigma, u, v = reference.power_iteration(w, torch.randn(n, dtype=dtype), 50)
    b = torch.randn(m, dtype=dtype) if bias else None
    return torch.randn(batch, n, dtype=dtype), w, b, sigma, u, v


@pytest.mark.parametrize("shape", [(5, 7, 6), (33, 40, 20), (70, 17, 40)])
@pytest.mark.parametrize("bias", [True, False])
def test_lip_linear_matches_reference(gemm, shape, bias):
    x, w, b, sigma, u, v = _lip_problem(*shape, bias)
    k = 1.7
    scale = k / sigma
    table = _backend.kernels(gemm)
    out = table.lip_linear(x, w, b, scale)
    ref_out = reference.lip_linear(x, w, b, scale)
    assert torch.allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    for needs in [
        (True, True, True),
        (False, True, False),
        (True, False, False),
        (False, False, True),
    ]:
        want = reference.lip_linear_backward(grad, x, w, b, ref_out, scale, u, v, k, needs)
        kept = [ref_out] + ([None] if needs[0] else [])  # y is optional when grad_x is computed
        for out_arg in kept:
            got = table.lip_linear_backward(grad, x, w, b, out_arg, scale, u, v, k, needs)
            for a, e in zip(got, want, strict=True):
                assert (a is None) == (e is None)
                if a is not None:
                    assert torch.allclose(a, e, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_lip_linear_gradients_match_naive_formula(gemm, bias):
    x, w, b, sigma, u, v = _lip_problem(9, 12, 10, bias)
    k = 2.5
    leaves = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
    out = F.lip_linear(leaves[0], leaves[1], leaves[2] if bias else None, k / sigma, u, v, k,
                       backend=gemm)  # fmt: skip
    out.sum().backward()  # an expanded (stride-0) output gradient
    exact = [t.detach().double().requires_grad_(True) for t in leaves]
    naive = naive_lip_linear(exact[0], exact[1], exact[2] if bias else None, u.double(),
                             v.double(), k)  # fmt: skip
    naive.sum().backward()
    assert torch.allclose(out.double(), naive, rtol=1e-5, atol=1e-5)
    for got, want in zip(leaves, exact, strict=True):
        assert torch.allclose(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4)


def test_opcheck_every_op():
    x = torch.randn(6, 12, requires_grad=True)
    for g in (2, 3):
        opcheck(ops.groupsort, (x, g, 1, "triton"), test_utils=OPCHECK_CPU)
        opcheck(ops.groupsort_backward, (torch.randn(6, 12), x.detach(), g, 1, "triton"),
                test_utils=OPCHECK_CPU)  # fmt: skip
    opcheck(ops.power_iteration, (torch.randn(7, 5), torch.randn(5), 3, "triton"),
            test_utils=OPCHECK_CPU)  # fmt: skip
    xx, w, b, sigma, u, v = _lip_problem(5, 4, 6, True)
    args = (xx.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 1.0 / sigma, u, v, 1.0)
    opcheck(ops.lip_linear, (*args, "triton"), test_utils=OPCHECK_CPU)


def test_liplinear_training_matches_torch_backend():
    losses = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(3)
        net = torch.nn.Sequential(
            LipLinear(12, 16, lipschitz=2.0, backend=backend),
            GroupSort(4, backend=backend),
            LipLinear(16, 4, backend=backend),
        )
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        x, y = torch.randn(8, 12), torch.randn(8, 4)
        losses[backend] = []
        for _ in range(5):
            loss = (net(x) - y).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[backend].append(loss.item())
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-5)
    assert losses["triton"][-1] < losses["triton"][0]


def test_cpu_tensors_are_refused_without_the_interpreter(monkeypatch):
    """Compiled (GPU) kernels cannot read CPU tensors: a clear error, never another backend."""

    def refuse(*args, **kwargs):
        raise AssertionError("a Triton kernel was launched for CPU tensors")

    monkeypatch.setattr(_common, "INTERPRETED", False)
    monkeypatch.setattr(_common, "launch", refuse)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for call in (
        lambda: ops.groupsort(torch.randn(4, 6), 3, 1, "triton"),
        lambda: ops.power_iteration(torch.randn(5, 6), torch.randn(6), 2, "triton"),
        lambda: _triton.lip_linear(torch.randn(2, 3), torch.randn(4, 3), None, torch.ones(())),
    ):
        with pytest.raises(RuntimeError, match="the triton backend cannot run cpu tensors"):
            call()


def test_power_iteration_empty_weight_and_no_steps():
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


def test_unusable_reasons(monkeypatch):
    assert _triton.unusable_reason("cpu") is None
    if not torch.cuda.is_available():
        assert "CUDA" in _triton.unusable_reason("cuda")
    assert "CUDA tensors only" in _triton.unusable_reason("mps")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in _triton.unusable_reason("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_common, "INTERPRETED", False)
    assert "before the import" in _triton.unusable_reason("cpu")


def test_auto_never_picks_the_interpreter_for_cpu():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert _backend.resolve(None, torch.device("cpu")) != "triton"
