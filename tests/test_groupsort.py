"""groupsort on every backend (torch reference, cpp, Triton interpreted on CPU and compiled on
CUDA): forward and backward against independent oracles (torch.sort on the grouped view, numpy)
in every layout and dtype, ties, NaN and signed zeros bit for bit, opcheck, double backward and
torch.func transforms, the GroupSort and MaxMin modules, and bad arguments."""

import contextlib

import numpy as np
import pytest
import torch
from helpers import needs_cpp, needs_interpreter
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.library import opcheck

import crvae_ext
import crvae_ext.functional as F
from crvae_ext import GroupSort, MaxMin, _backend, _cpp, ops, reference

if _backend.unusable_reason("triton", "cpu") is None:
    from crvae_ext._triton import groupsort as groupsort_module
    from crvae_ext._triton import kernels

    _triton = kernels.cublas

GPU_REASON = _backend.unusable_reason("cpp", "cuda") if torch.cuda.is_available() else "no CUDA"
DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def sort_oracle(x: torch.Tensor, group_size: int, dim: int) -> torch.Tensor:
    """torch.sort on (..., groups, group_size, ...): differentiable by torch's own sort backward."""
    d = dim % x.dim()
    return x.unflatten(d, (-1, group_size)).sort(dim=d + 1).values.flatten(d, d + 1)


CASES = [
    ((8, 12), 2, 1),
    ((8, 12), 3, 1),
    ((8, 12), 4, -1),
    ((8, 12), 12, 1),  # full sort
    ((6, 8, 5), 8, 1),
    ((4, 6, 3, 5), 2, 1),  # N x C x H x W, groups along channels
    ((12, 5), 4, 0),
    ((3, 4, 10), 5, 2),
]


@pytest.mark.parametrize(("shape", "group_size", "dim"), CASES)
def test_forward_and_backward_match_oracle(shape, group_size, dim):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = F.groupsort(x, group_size, dim)
    expected = sort_oracle(x, group_size, dim)
    assert torch.equal(out, expected)
    grad_out = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, grad_out)
    (want,) = torch.autograd.grad(expected, x, grad_out)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("make", "dim"),
    [
        (lambda t: t.t(), 1),
        (lambda t: t[:, ::2], 1),
        (lambda t: t.reshape(4, 4, 48).permute(0, 2, 1), 1),  # channels-last style
    ],
    ids=["transposed", "strided", "permuted"],
)
def test_non_contiguous_input(make, dim):
    x = make(torch.randn(16, 48, dtype=torch.float64)).detach().requires_grad_(True)
    assert not x.is_contiguous()
    out = F.groupsort(x, 2, dim)
    assert torch.equal(out, sort_oracle(x.detach(), 2, dim))
    grad_out = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, grad_out)
    (want,) = torch.autograd.grad(sort_oracle(x, 2, dim), x, grad_out)
    assert torch.equal(got, want)


def test_gradcheck():
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: F.groupsort(t, 3, 1), (x,))


def test_modules():
    x = torch.randn(5, 8)
    assert torch.equal(MaxMin()(x), sort_oracle(x, 2, 1))
    assert torch.equal(GroupSort(4, dim=-1)(x), sort_oracle(x, 4, -1))
    assert torch.equal(GroupSort(1)(x), x)
    assert "group_size=4" in repr(GroupSort(4))


def test_ties_route_each_gradient_once():
    x = torch.tensor([[1.0, 1.0, 2.0, 2.0]], requires_grad=True)
    out = F.groupsort(x, 4, 1)
    (grad,) = torch.autograd.grad(out, x, torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert sorted(grad.flatten().tolist()) == [1.0, 2.0, 3.0, 4.0]


def test_empty_batch():
    x = torch.randn(0, 6)
    assert F.groupsort(x, 3, 1).shape == (0, 6)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 5),
    groups=st.integers(1, 6),
    group_size=st.sampled_from([2, 3, 4, 5, 8]),
    inner=st.integers(1, 3),
)
def test_property_matches_oracle(batch, groups, group_size, inner):
    x = torch.randn(batch, groups * group_size, inner, dtype=torch.float64)
    assert torch.equal(F.groupsort(x, group_size, 1), sort_oracle(x, group_size, 1))


BACKENDS = [b for b in crvae_ext.backends("cpu") if b != "triton_gemm"]


@pytest.mark.parametrize("path", ["functional", "public_op"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_size", [2, 3, 4])
def test_double_backward_gradgradcheck(backend, group_size, path):
    """Gradient penalties through GroupSort (WGAN-GP style): second derivatives on every backend
    against finite differences; the backward is a permutation, so d(grad_x)/d(grad) is one."""
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)

    def f(t):
        if path == "functional":
            return F.groupsort(t, group_size, 1, backend=backend)
        return crvae_ext.ops.groupsort(t, group_size, 1, backend)

    assert torch.autograd.gradgradcheck(lambda t: f(t) * torch.arange(12.0).double(), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_matches_the_sort_oracle(backend):
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64)
    penalties = []
    for f in (lambda t: F.groupsort(t, 4, 1, backend=backend), lambda t: sort_oracle(t, 4, 1)):
        (g,) = torch.autograd.grad((f(x).square() * w).sum(), x, create_graph=True)
        penalties.append(torch.autograd.grad(g.square().sum(), x)[0])
    torch.testing.assert_close(penalties[0], penalties[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functorch_jacrev_vmap_grad(backend):
    """torch.func transforms: the Jacobian is the sorting permutation, vmap equals a loop."""
    layer = GroupSort(4, dim=0, backend=backend)
    x = torch.randn(8, dtype=torch.float64)
    jacobian = torch.func.jacrev(layer)(x)
    assert torch.equal(jacobian, torch.func.jacrev(lambda t: sort_oracle(t, 4, 0))(x))
    assert torch.equal(jacobian @ x, sort_oracle(x, 4, 0))  # a permutation matrix
    batch = torch.randn(5, 8, dtype=torch.float64)
    assert torch.equal(torch.func.vmap(layer)(batch), torch.stack([layer(r) for r in batch]))
    weights = torch.randn(8, dtype=torch.float64)
    got = torch.func.grad(lambda t: (layer(t) * weights).sum())(x)
    want = torch.func.grad(lambda t: (sort_oracle(t, 4, 0) * weights).sum())(x)
    assert torch.equal(got, want)
    per_row = torch.func.vmap(torch.func.jacrev(layer))(batch)
    assert torch.equal(per_row[2], torch.func.jacrev(layer)(batch[2]))


def _numpy_groupsort(x: np.ndarray, group_size: int, dim: int) -> np.ndarray:
    moved = np.moveaxis(x, dim, -1)
    shape = moved.shape
    out = np.sort(moved.reshape(*shape[:-1], shape[-1] // group_size, group_size), axis=-1)
    return np.moveaxis(out.reshape(shape), -1, dim)


@pytest.mark.parametrize(
    ("shape", "group_size", "dim"), [((5, 12), 3, 1), ((4, 6, 3), 2, 1), ((8, 5), 8, 0)]
)
def test_reference_matches_numpy(shape, group_size, dim):
    x = torch.randn(shape, dtype=torch.float64)
    expected = _numpy_groupsort(x.numpy(), group_size, dim)
    np.testing.assert_array_equal(reference.groupsort(x, group_size, dim).numpy(), expected)


def test_reference_backward_is_the_adjoint():
    x = torch.randn(6, 12, dtype=torch.float64)
    g = torch.randn(6, 12, dtype=torch.float64)
    r = torch.randn(6, 12, dtype=torch.float64)
    # <g, J r> == <J^T g, r> with J the (locally linear) permutation.
    lhs = (
        g * reference.groupsort(x + 1e-9 * r, 4, 1).sub(reference.groupsort(x, 4, 1)) / 1e-9
    ).sum()
    rhs = (reference.groupsort_backward(g, x, 4, 1) * r).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"group_size": 0}, ValueError, "group_size must be >= 1"),
        ({"group_size": 2.5}, TypeError, "group_size must be an integer"),
        ({"group_size": True}, TypeError, "group_size must be an integer"),
        ({"dim": "1"}, TypeError, "dim must be an integer"),
        ({"backend": "cuda"}, ValueError, "backend must be None, 'auto' or one of"),
    ],
)
def test_groupsort_constructor(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        GroupSort(**kwargs)


def test_groupsort_call_errors():
    with pytest.raises(ValueError, match="group_size=3 does not divide size 8 of dim 1"):
        F.groupsort(torch.randn(2, 8), 3)
    with pytest.raises(ValueError, match="dim=2 is out of range"):
        F.groupsort(torch.randn(2, 8), 2, dim=2)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        F.groupsort(torch.arange(8).reshape(2, 4), 2)
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor"):
        F.groupsort([1.0, 2.0], 2)
    with pytest.raises(ValueError, match="at least one dimension"):
        F.groupsort(torch.tensor(1.0), 1)


@pytest.mark.parametrize("shape_dim", [((6, 8), 1), ((3, 4, 5), 1), ((10, 3), 0)])
def test_opcheck_torch(shape_dim):
    shape, dim = shape_dim
    x = torch.randn(shape, requires_grad=True)
    opcheck(ops.groupsort, (x, 2, dim, "torch"))
    opcheck(ops.groupsort_backward, (torch.randn(shape), x.detach(), 2, dim, "torch"))


def _lib():
    return torch.ops.crvae_ext_cpp


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (tells -0.0 from 0.0 and compares NaNs)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(ints), b.view(ints))


# (name, shape, group_size, dim, make): make turns a contiguous tensor into the layout tested.
LAYOUTS = [
    ("pairs_flat_tail", (37, 10), 2, 1, None),  # 185 pairs: vector body and a scalar tail
    ("pairs_rows_sliced", (6, 24), 2, 1, lambda t: t[:, :18]),  # rows not adjacent in memory
    # 15 pairs per row: float takes a 64-byte vector (where built), a 32-byte one, a scalar tail
    ("pairs_vector_tails", (9, 32), 2, 1, lambda t: t[:, :30]),
    ("quads", (5, 24), 4, 1, None),
    ("octets", (7, 48), 8, 1, None),
    ("octets_short", (3, 8), 8, 1, None),  # fewer groups than vector lanes
    ("rows_dim0", (12, 33), 2, 0, None),  # groups across a contiguous inner dimension
    ("rows_quads", (2, 8, 17), 4, 1, None),
    ("rows_octets_dim0", (16, 9), 8, 0, None),
    ("odd_group", (4, 15), 3, 1, None),
    ("odd_group_rows", (10, 7), 5, 0, None),
    ("full_sort", (6, 12), 12, 1, None),
    ("long_groups", (3, 80), 40, 1, None),  # stable_sort path (> 32)
    ("one_d", (16,), 4, 0, None),
    ("transposed", (16, 48), 2, 1, lambda t: t.t()),
    ("strided", (16, 48), 2, 1, lambda t: t[:, ::2]),
    ("channels_last", (4, 4, 48), 2, 1, lambda t: t.reshape(4, 4, 48).permute(0, 2, 1)),
    ("threads_pairs", (64, 2048), 2, 1, None),
    ("threads_rows", (64, 2048), 4, 0, None),
]


def _input(shape, dtype, kind: str) -> torch.Tensor:
    if kind == "ties":
        return torch.randint(-2, 3, shape).to(dtype)
    if kind == "special":
        pool = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -1.0])
        return pool[torch.randint(0, len(pool), shape)].to(dtype)
    return torch.randn(shape, dtype=dtype)


@needs_cpp
@pytest.mark.parametrize("kind", ["randn", "ties", "special"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("name", "shape", "group_size", "dim", "make"), LAYOUTS, ids=[c[0] for c in LAYOUTS]
)
def test_cpp_matches_stable_sort(name, shape, group_size, dim, make, dtype, kind):
    base = _input(shape, dtype, kind)
    x = make(base) if make else base
    grad = torch.randn(x.shape, dtype=dtype)
    assert _bits_equal(_cpp.groupsort(x, group_size, dim), reference.groupsort(x, group_size, dim))
    got = _cpp.groupsort_backward(grad, x, group_size, dim)
    assert _bits_equal(got, reference.groupsort_backward(grad, x, group_size, dim))
    assert _cpp.groupsort(x, group_size, dim).is_contiguous() and got.is_contiguous()


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [2, 4, 3])
def test_cpp_half_precision(dtype, group_size):
    x = _input((9, 24), dtype, "special")
    grad = torch.randn(9, 24).to(dtype)
    assert _bits_equal(_cpp.groupsort(x, group_size, 1), reference.groupsort(x, group_size, 1))
    assert _bits_equal(
        _cpp.groupsort_backward(grad, x, group_size, 1),
        reference.groupsort_backward(grad, x, group_size, 1),
    )


@needs_cpp
def test_cpp_backward_with_strided_grad():
    x = torch.randn(8, 32)
    grad = torch.randn(32, 8).t()  # non-contiguous grad, contiguous x
    want = reference.groupsort_backward(grad, x, 4, 1)
    assert _bits_equal(_cpp.groupsort_backward(grad, x, 4, 1), want)


@needs_cpp
def test_cpp_nan_sorts_last_and_ties_keep_order():
    x = torch.tensor([[float("nan"), 1.0, 0.0, -0.0, 1.0, float("nan"), -float("inf"), 2.0]])
    out = _cpp.groupsort(x, 8, 1)
    assert out[0, :6].tolist() == [-float("inf"), 0.0, -0.0, 1.0, 1.0, 2.0]
    assert torch.isnan(out[0, 6:]).all()
    assert not torch.signbit(out[0, 1]) and torch.signbit(out[0, 2])  # stable: 0.0 came first
    grad = torch.arange(8.0).unsqueeze(0)  # output slot q sends q back to its source
    back = _cpp.groupsort_backward(grad, x, 8, 1)
    assert back.tolist() == [[6.0, 3.0, 1.0, 2.0, 4.0, 7.0, 0.0, 5.0]]


@needs_cpp
def test_cpp_autograd_paths_agree():
    x = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(6, 40, dtype=torch.float64)
    eager = torch.autograd.grad(F.groupsort(x, 4, 1, backend="cpp"), x, grad)[0]  # kernels
    public = torch.autograd.grad(ops.groupsort(x, 4, 1, "cpp"), x, grad)[0]
    want = reference.groupsort_backward(grad, x.detach(), 4, 1)
    assert torch.equal(eager, want) and torch.equal(public, want)
    assert torch.autograd.gradcheck(lambda t: F.groupsort(t, 3, 1, backend="cpp"), (x[:, :12],))


@needs_cpp
@pytest.mark.parametrize("path", ["functional", "public"])
def test_cpp_double_backward(path):
    """Gradient penalties through GroupSort: second derivatives against finite differences."""
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)

    def f(t):
        return (
            F.groupsort(t, 4, 1, backend="cpp")
            if path == "functional"
            else ops.groupsort(t, 4, 1, "cpp")
        )

    assert torch.autograd.gradgradcheck(lambda t: f(t).square(), (x,))


@needs_cpp
def test_cpp_checked_entry():
    """F.groupsort's one call into the cpp backend (groupsort_autograd, which checks its own
    arguments): the stable-sort result for any dim, a node only where a gradient is wanted, and
    bad arguments raised as ValueError/TypeError, for F's checks to name them."""
    x = torch.randn(3, 8, 6, dtype=torch.float64)
    for dim in (-3, -1, 0, 1, 2):
        size = x.shape[dim]
        got = F.groupsort(x, size // 2 if size % 2 == 0 else size, dim, backend="cpp")
        want = reference.groupsort(x, size // 2 if size % 2 == 0 else size, dim % 3)
        assert torch.equal(got, want) and got.grad_fn is None
    leaf = x.clone().requires_grad_()
    with torch.no_grad():
        assert F.groupsort(leaf, 2, -1, backend="cpp").grad_fn is None
    assert type(F.groupsort(leaf, 2, -1, backend="cpp").grad_fn).__name__ == "CppFunction"
    assert F.groupsort(x, 1, 1, backend="cpp") is x
    entry = _cpp.groupsort_autograd
    for args, exc in [((x, 3, 1), ValueError), ((x, 2, 3), ValueError), ((x, 2, -4), ValueError),
                      ((x, 1, 1), ValueError), ((x.long(), 2, 1), TypeError),
                      ((torch.tensor(1.0), 2, 0), ValueError)]:  # fmt: skip
        with pytest.raises(exc):
            entry(*args)
    with pytest.raises(ValueError, match="group_size=3 does not divide size 8 of dim 1"):
        F.groupsort(x, 3, 1, backend="cpp")
    with pytest.raises(ValueError, match="dim=-4 is out of range"):
        F.groupsort(x, 2, -4, backend="cpp")
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        F.groupsort(x.long(), 2, 1, backend="cpp")


@needs_cpp
def test_cpp_bad_arguments_are_errors():
    with pytest.raises(RuntimeError, match="does not divide size 10"):
        _cpp.groupsort(torch.randn(2, 10), 4, 1)
    with pytest.raises(RuntimeError, match="dim=2 is out of range"):
        _cpp.groupsort(torch.randn(2, 10), 2, 2)
    with pytest.raises(RuntimeError, match="floating-point"):
        _cpp.groupsort(torch.ones(2, 4, dtype=torch.int32), 2, 1)
    with pytest.raises(RuntimeError, match="grad has shape"):
        _cpp.groupsort_backward(torch.randn(2, 6), torch.randn(2, 4), 2, 1)


@needs_cpp
def test_opcheck_cpp():
    """The crvae_ext_cpp ops are the backend's kernels (no autograd of their own: the public
    ops' formula differentiates them); the public op on the cpp backend."""
    x = torch.randn(6, 8)
    opcheck(_lib().groupsort.default, (x, 2, 1))
    opcheck(_lib().groupsort.default, (torch.randn(5, 12), 3, 1))
    opcheck(_lib().groupsort_backward.default, (torch.randn(6, 8), x, 4, 1))
    x = torch.randn(6, 8, requires_grad=True)
    opcheck(ops.groupsort, (x, 2, 1, "cpp"))
    opcheck(ops.groupsort_backward, (torch.randn(6, 8), x.detach(), 2, 1, "cpp"))


@pytest.mark.gpu
@pytest.mark.skipif(GPU_REASON is not None, reason=f"cpp CUDA kernels unusable: {GPU_REASON}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("name", "shape", "group_size", "dim", "make"), LAYOUTS, ids=[c[0] for c in LAYOUTS]
)
def test_cpp_cuda_matches_reference(name, shape, group_size, dim, make, dtype):
    base = _input(shape, dtype, "special").cuda()
    x = make(base) if make else base
    grad = torch.randn(x.shape, device="cuda").to(dtype)
    assert _bits_equal(_cpp.groupsort(x, group_size, dim), reference.groupsort(x, group_size, dim))
    assert _bits_equal(
        _cpp.groupsort_backward(grad, x, group_size, dim),
        reference.groupsort_backward(grad, x, group_size, dim),
    )


GROUP_SIZES = [2, 4, 8, 3, 5, 6, 16]


# opcheck's AOT-dispatch test cannot trace interpreted kernels (FakeTensor data pointers);
# test_triton_cuda_opcheck runs the full opcheck on CUDA.
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


@needs_interpreter
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
def test_triton_matches_torch_sort(make_shape, dim, blocked, group_size, monkeypatch):
    if blocked:  # 2-D programs over inner positions (large inner dims) on a small shape
        monkeypatch.setattr(groupsort_module, "BLOCKED_INNER", 4)
    shape = make_shape(group_size)
    x = torch.randn(shape)
    x.view(-1)[1::2] = x.view(-1)[::2][: x.numel() // 2]  # exact ties between neighbours
    _check_groupsort(x, group_size, dim)
    _check_groupsort(_tied(shape), group_size, dim)


@needs_interpreter
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
def test_triton_strided_inputs(make, dim, group_size):
    x = make(_tied((12, 48)))
    if x.shape[dim] % group_size:
        pytest.skip("group size does not divide this layout")
    assert not x.is_contiguous()
    _check_groupsort(x, group_size, dim)


@needs_interpreter
def test_triton_fp64_and_full_sort():
    _check_groupsort(torch.randn(3, 40, dtype=torch.float64), 40, 1)
    _check_groupsort(torch.randn(4, 8, dtype=torch.float64), 8, 1)


@needs_interpreter
@settings(max_examples=15, deadline=None)
@given(
    outer=st.integers(1, 4),
    groups=st.integers(1, 4),
    inner=st.integers(1, 3),
    group_size=st.sampled_from([2, 3, 4, 5, 8]),
    step=st.sampled_from([1, 2]),
)
def test_triton_property_over_shapes(outer, groups, inner, group_size, step):
    base = _tied((outer, groups * group_size * step, inner))
    _check_groupsort(base[:, ::step], group_size, 1)


@needs_interpreter
@pytest.mark.parametrize("group_size", [2, 4, 3])
def test_triton_autograd_through_the_op(group_size):
    x = torch.randn(4, 12, 3, requires_grad=True)
    out = GroupSort(group_size, dim=1, backend="triton")(x)
    expected = x.unflatten(1, (-1, group_size)).sort(dim=2).values.flatten(1, 2)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(expected, x, grad)
    assert torch.equal(got, want)


@needs_interpreter
def test_opcheck_triton():
    x = torch.randn(6, 12, requires_grad=True)
    for g in (2, 3):
        opcheck(ops.groupsort, (x, g, 1, "triton"), test_utils=OPCHECK_CPU)
        opcheck(ops.groupsort_backward, (torch.randn(6, 12), x.detach(), g, 1, "triton"),
                test_utils=OPCHECK_CPU)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize(
    ("shape", "dim"),
    [((64, 480), 1), ((8, 240, 7, 9), 1), ((4, 48, 300), 1), ((240, 33), 0)],
    ids=["rows", "nchw", "blocked-inner", "dim0"],
)
def test_triton_cuda_exact_in_every_dtype(shape, dim, group_size, dtype):
    x = torch.randint(-4, 5, shape, device=DEVICE).to(dtype)  # ties everywhere
    x.view(-1)[::7] = float("nan")
    grad = torch.randn(shape, device=DEVICE).to(dtype)
    out = ops.groupsort(x, group_size, dim, "triton")
    want = reference.groupsort(x, group_size, dim)
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out.nan_to_num(), want.nan_to_num())
    got = ops.groupsort_backward(grad, x, group_size, dim, "triton")
    assert torch.equal(got, reference.groupsort_backward(grad, x, group_size, dim))


@pytest.mark.gpu
@pytest.mark.parametrize("group_size", [2, 4, 8, 3])
def test_triton_cuda_strided_and_large(group_size):
    base = torch.randn(512, 4096 * 2, device=DEVICE)
    for x, dim in [(base[:, ::2], 1), (base.t(), 0), (base[:, :4096].t(), 1)]:
        if x.shape[dim] % group_size:
            continue
        assert torch.equal(ops.groupsort(x, group_size, dim, "triton"),
                           reference.groupsort(x, group_size, dim))  # fmt: skip
        grad = torch.randn(x.shape, device=DEVICE)
        assert torch.equal(ops.groupsort_backward(grad, x, group_size, dim, "triton"),
                           reference.groupsort_backward(grad, x, group_size, dim))  # fmt: skip


@pytest.mark.gpu
def test_triton_cuda_opcheck():
    x = torch.randn(6, 12, 5, device=DEVICE, requires_grad=True)
    for g in (2, 3, 4):
        opcheck(ops.groupsort, (x, g, 1, "triton"))
        opcheck(ops.groupsort_backward, (torch.randn_like(x), x.detach(), g, 1, "triton"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_gradient_layout_matches_the_oracle(backend, monkeypatch):
    """Dense, expanded (y.sum().backward()) and transposed upstream gradients; an expanded one
    skips the kernel (equal values along dim: no permutation moves them)."""
    x = torch.randn(6, 16, dtype=torch.float64)
    layouts = {
        "dense": torch.randn(6, 16, dtype=torch.float64),
        "expanded": torch.ones((), dtype=torch.float64).expand(6, 16),
        "rows_expanded": torch.randn(6, 1, dtype=torch.float64).expand(6, 16),
        "transposed": torch.randn(16, 6, dtype=torch.float64).t(),
    }
    for name, grad in layouts.items():
        leaf = x.clone().requires_grad_(True)
        with _kernel_calls(backend, "groupsort_backward", monkeypatch) as calls:
            (got,) = torch.autograd.grad(F.groupsort(leaf, 4, 1, backend=backend), leaf, grad)
        oracle = x.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(sort_oracle(oracle, 4, 1), oracle, grad)
        assert torch.equal(got, want), name
        assert (calls() == 0) == name.endswith("expanded"), name


@contextlib.contextmanager
def _kernel_calls(backend: str, name: str, monkeypatch):
    """Counts the backend's kernel ``name`` calls within: Python kernels by a wrapper, the cpp
    backend's (called from its C++ autograd node too) by the profiler's record of the op."""
    if backend == "cpp":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            yield lambda: sum(
                e.count for e in prof.key_averages() if e.key == f"crvae_ext_cpp::{name}"
            )
        return
    calls = []
    kernels = crvae_ext._backend.kernels(backend)
    original = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a: calls.append(1) or original(*a))
    yield lambda: len(calls)
    monkeypatch.undo()


@needs_cpp
def test_cpp_autograd_node_is_the_cpp_one_in_eager_mode():
    """Plain eager on the cpp backend records its C++ node (no Python node per call); under a
    torch.func transform the public op's Python formula runs instead."""
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    assert type(F.groupsort(x, 2, 1, backend="cpp").grad_fn).__name__ == "CppFunction"
    assert type(F.groupsort(x, 2, 1, backend="torch").grad_fn).__name__ != "CppFunction"
    grad = torch.randn(4, 8, dtype=torch.float64)
    got = torch.func.vjp(lambda t: F.groupsort(t, 2, 1, backend="cpp"), x)[1](grad)[0]
    assert torch.equal(got, reference.groupsort_backward(grad, x.detach(), 2, 1))
