"""The cpp backend (csrc/) against the plain-PyTorch oracles in reference.py and torch.sort.

Covers every kernel path: GroupSort's packed pairs, de-interleaved groups, inner-dimension rows,
the scalar argsort (odd group sizes, strided input, fp16/bf16), ties, NaN and signed zeros; the
power iteration's row blocks, thread chunks and tails; lip_linear's fused backward. Also
opcheck on the crvae_ext_cpp ops and on the public ops with backend "cpp".
"""

import pytest
import torch
from helpers import naive_lip_linear
from torch.library import opcheck

import crvae_ext.functional as F
from crvae_ext import _backend, _cpp, ops, reference

REASON = _backend.unusable_reason("cpp", "cpu")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"cpp backend unusable: {REASON}")


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


@pytest.mark.parametrize("kind", ["randn", "ties", "special"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("name", "shape", "group_size", "dim", "make"), LAYOUTS, ids=[c[0] for c in LAYOUTS]
)
def test_groupsort_matches_stable_sort(name, shape, group_size, dim, make, dtype, kind):
    base = _input(shape, dtype, kind)
    x = make(base) if make else base
    grad = torch.randn(x.shape, dtype=dtype)
    assert _bits_equal(_cpp.groupsort(x, group_size, dim), reference.groupsort(x, group_size, dim))
    got = _cpp.groupsort_backward(grad, x, group_size, dim)
    assert _bits_equal(got, reference.groupsort_backward(grad, x, group_size, dim))
    assert _cpp.groupsort(x, group_size, dim).is_contiguous() and got.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [2, 4, 3])
def test_groupsort_half_precision(dtype, group_size):
    x = _input((9, 24), dtype, "special")
    grad = torch.randn(9, 24).to(dtype)
    assert _bits_equal(_cpp.groupsort(x, group_size, 1), reference.groupsort(x, group_size, 1))
    assert _bits_equal(
        _cpp.groupsort_backward(grad, x, group_size, 1),
        reference.groupsort_backward(grad, x, group_size, 1),
    )


def test_groupsort_backward_with_strided_grad():
    x = torch.randn(8, 32)
    grad = torch.randn(32, 8).t()  # non-contiguous grad, contiguous x
    want = reference.groupsort_backward(grad, x, 4, 1)
    assert _bits_equal(_cpp.groupsort_backward(grad, x, 4, 1), want)


def test_groupsort_nan_sorts_last_and_ties_keep_order():
    x = torch.tensor([[float("nan"), 1.0, 0.0, -0.0, 1.0, float("nan"), -float("inf"), 2.0]])
    out = _cpp.groupsort(x, 8, 1)
    assert out[0, :6].tolist() == [-float("inf"), 0.0, -0.0, 1.0, 1.0, 2.0]
    assert torch.isnan(out[0, 6:]).all()
    assert not torch.signbit(out[0, 1]) and torch.signbit(out[0, 2])  # stable: 0.0 came first
    grad = torch.arange(8.0).unsqueeze(0)  # output slot q sends q back to its source
    back = _cpp.groupsort_backward(grad, x, 8, 1)
    assert back.tolist() == [[6.0, 3.0, 1.0, 2.0, 4.0, 7.0, 0.0, 5.0]]


def test_groupsort_autograd_paths_agree():
    x = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(6, 40, dtype=torch.float64)
    eager = torch.autograd.grad(F.groupsort(x, 4, 1, backend="cpp"), x, grad)[0]  # kernels
    public = torch.autograd.grad(ops.groupsort(x, 4, 1, "cpp"), x, grad)[0]
    want = reference.groupsort_backward(grad, x.detach(), 4, 1)
    assert torch.equal(eager, want) and torch.equal(public, want)
    assert torch.autograd.gradcheck(lambda t: F.groupsort(t, 3, 1, backend="cpp"), (x[:, :12],))


@pytest.mark.parametrize("path", ["functional", "public"])
def test_groupsort_double_backward(path):
    """Gradient penalties through GroupSort: second derivatives against finite differences."""
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)

    def f(t):
        return (
            F.groupsort(t, 4, 1, backend="cpp")
            if path == "functional"
            else ops.groupsort(t, 4, 1, "cpp")
        )

    assert torch.autograd.gradgradcheck(lambda t: f(t).square(), (x,))


def test_groupsort_bad_arguments_are_errors():
    with pytest.raises(RuntimeError, match="does not divide size 10"):
        _cpp.groupsort(torch.randn(2, 10), 4, 1)
    with pytest.raises(RuntimeError, match="dim=2 is out of range"):
        _cpp.groupsort(torch.randn(2, 10), 2, 2)
    with pytest.raises(RuntimeError, match="floating-point"):
        _cpp.groupsort(torch.ones(2, 4, dtype=torch.int32), 2, 1)
    with pytest.raises(RuntimeError, match="grad has shape"):
        _cpp.groupsort_backward(torch.randn(2, 6), torch.randn(2, 4), 2, 1)


PI_SHAPES = [(1, 1), (1, 9), (9, 1), (7, 5), (13, 1031), (300, 517), (64, 64), (5, 300)]


@pytest.mark.parametrize("n_iters", [1, 3, 25])
@pytest.mark.parametrize("shape", PI_SHAPES, ids=[f"{m}x{n}" for m, n in PI_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_power_iteration_matches_float64_reference(shape, dtype, n_iters):
    w = torch.randn(shape).to(dtype)
    v = torch.randn(shape[1]).to(dtype)
    sigma, u, v_new = _cpp.power_iteration(w, v, n_iters)
    want = reference.power_iteration(w.double(), v.double(), n_iters)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    rtol, atol = (1e-12, 1e-14) if dtype == torch.float64 else (2e-6, 1e-7)
    for got, expected in zip((sigma, u, v_new), want, strict=True):
        assert got.dtype == out_dtype
        torch.testing.assert_close(got, expected.to(out_dtype), rtol=rtol, atol=atol)


def test_power_iteration_layouts_and_zero_weight():
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


def test_power_iteration_converges_to_svd():
    w = torch.randn(60, 45, dtype=torch.float64)
    sigma, u, v = _cpp.power_iteration(w, torch.ones(45, dtype=torch.float64), 2000)
    assert sigma.item() == pytest.approx(reference.spectral_norm_exact(w), rel=1e-10)
    assert torch.dot(u, w @ v).item() == pytest.approx(sigma.item(), rel=1e-12)


def _lip_problem(dtype, bias: bool, batch: int = 9, shape=(7, 11)):
    w = torch.randn(shape, dtype=dtype)
    x = torch.randn(batch, shape[1], dtype=dtype)
    b = torch.randn(shape[0], dtype=dtype) if bias else None
    sigma, u, v = reference.power_iteration(w.double(), torch.randn(shape[1]).double(), 30)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return x, w, b, (1.7 / sigma).to(acc), u.to(acc), v.to(acc)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lip_linear_forward(dtype, bias):
    x, w, b, scale, _, _ = _lip_problem(dtype, bias)
    want = reference.lip_linear(x.double(), w.double(), None if b is None else b.double(), scale)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(_cpp.lip_linear(x, w, b, scale).double(), want, rtol=tol, atol=tol)
    strided = torch.randn(x.shape[1], x.shape[0], dtype=dtype).t().copy_(x)
    torch.testing.assert_close(
        _cpp.lip_linear(strided, w, b, scale), _cpp.lip_linear(x, w, b, scale)
    )


NEEDS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]


@pytest.mark.parametrize("needs", NEEDS, ids=["all", "x", "w", "b"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("grad_kind", ["dense", "expanded", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lip_linear_backward_matches_reference(dtype, grad_kind, bias, needs):
    x, w, b, scale, u, v = _lip_problem(dtype, bias, batch=33, shape=(24, 40))
    out = _cpp.lip_linear(x, w, b, scale)
    grad = {
        "dense": torch.randn(out.shape, dtype=dtype),
        "expanded": torch.ones((), dtype=dtype).expand(out.shape),
        "transposed": torch.randn(out.shape[::-1], dtype=dtype).t(),
    }[grad_kind]
    kept = None if needs[0] else out  # y is optional when grad_x is computed
    got = _cpp.lip_linear_backward(grad, x, w, b, kept, scale, u, v, 1.7, needs)
    d = [t.double() if t is not None else None for t in (grad, x, w, b, out, scale, u, v)]
    want = reference.lip_linear_backward(*d, 1.7, needs)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    expected_present = (needs[0], needs[1], needs[2] and bias)
    for g, e, present in zip(got, want, expected_present, strict=True):
        assert (g is not None) == present
        if present:
            assert g.dtype == dtype
            torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol)


def test_lip_linear_backward_needs_y_without_grad_x():
    x, w, b, scale, u, v = _lip_problem(torch.float32, True)
    grad = torch.randn(x.shape[0], w.shape[0])
    with pytest.raises(RuntimeError, match="out is required"):
        _cpp.lip_linear_backward(grad, x, w, b, None, scale, u, v, 1.7, (False, True, False))


def test_lip_linear_large_bias_does_not_cancel():
    """<G, y - b> from <grad_x, x> does not subtract two large numbers when |b| >> |x W^T|."""
    x, w, _, scale, u, v = _lip_problem(torch.float32, False, batch=64, shape=(32, 48))
    b = torch.full((32,), 1e4)
    out = _cpp.lip_linear(x, w, b, scale)
    grad = torch.randn(out.shape)
    d = [t.double() for t in (grad, x, w, b, out, scale, u, v)]
    d[4] = reference.lip_linear(d[1], d[2], d[3], d[5])  # y in float64
    want = reference.lip_linear_backward(*d, 1.7, (True, True, True))[1]
    got = _cpp.lip_linear_backward(grad, x, w, b, out, scale, u, v, 1.7, (True, True, True))[1]
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=5e-6)  # y path: ~3e-5


@pytest.mark.parametrize("bias", [True, False])
def test_lip_linear_gradients_match_naive_formula(bias):
    x, w, b, scale, u, v = _lip_problem(torch.float64, bias)
    k = 1.7
    scale = (k / torch.dot(u, w @ v)).detach()
    inputs = [t.requires_grad_(True) for t in (x, w, b) if t is not None]
    grad = torch.randn(x.shape[0], w.shape[0], dtype=torch.float64)
    for run in (
        lambda: F.lip_linear(x, w, b, scale, u, v, k, backend="cpp"),  # eager fast path
        lambda: ops.lip_linear(x, w, b, scale, u, v, k, "cpp"),  # public op
    ):
        got = torch.autograd.grad(run(), inputs, grad)
        want = torch.autograd.grad(naive_lip_linear(x, w, b, u, v, k), inputs, grad)
        for a, e in zip(got, want, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_opcheck_cpp_library_ops():
    """The crvae_ext_cpp ops are the backend's kernels (no autograd of their own: the public
    ops' formula differentiates them)."""
    x = torch.randn(6, 8)
    opcheck(_lib().groupsort.default, (x, 2, 1))
    opcheck(_lib().groupsort.default, (torch.randn(5, 12), 3, 1))
    opcheck(_lib().groupsort_backward.default, (torch.randn(6, 8), x, 4, 1))
    opcheck(_lib().power_iteration.default, (torch.randn(7, 5), torch.randn(5), 3))
    x, w, b, scale, u, v = _lip_problem(torch.float32, True)
    opcheck(_lib().lip_linear.default, (x, w, b, scale))
    out = _cpp.lip_linear(x, w, b, scale)
    for needs in NEEDS:
        for bias in (b, None):
            args = (torch.randn(out.shape), x, w, bias, out, scale, u, v, 1.7, list(needs))
            opcheck(_lib().lip_linear_backward.default, args)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_public_ops_on_cpp(bias):
    x = torch.randn(6, 8, requires_grad=True)
    opcheck(ops.groupsort, (x, 2, 1, "cpp"))
    opcheck(ops.groupsort_backward, (torch.randn(6, 8), x.detach(), 2, 1, "cpp"))
    opcheck(ops.power_iteration, (torch.randn(7, 5), torch.randn(5), 3, "cpp"))
    x, w, b, scale, u, v = _lip_problem(torch.float32, bias)
    args = [t.requires_grad_(True) for t in (x, w)] + [b.requires_grad_(True) if bias else None]
    opcheck(ops.lip_linear, (*args, scale, u, v, 1.7, "cpp"))


def test_cpp_is_the_default_on_cpu():
    assert _backend.resolve(None, torch.device("cpu")) == "cpp"


def test_plain_eager_calls_the_kernel_and_tracing_the_public_op(monkeypatch):
    """Eager calls skip the op's dispatch; compile (and functorch) must see the public op."""
    seen = []
    public = ops._PUBLIC["groupsort"]
    monkeypatch.setitem(ops._PUBLIC, "groupsort", lambda *a: seen.append("op") or public(*a))
    x = torch.randn(4, 6)
    ops.call("groupsort", "cpp", x, 2, 1)
    assert seen == [] and _backend.plain_eager()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not _backend.plain_eager()
    assert torch.equal(ops.call("groupsort", "cpp", x, 2, 1), reference.groupsort(x, 2, 1))
    assert seen == ["op"]


GPU_REASON = _backend.unusable_reason("cpp", "cuda") if torch.cuda.is_available() else "no CUDA"


@pytest.mark.gpu
@pytest.mark.skipif(GPU_REASON is not None, reason=f"cpp CUDA kernels unusable: {GPU_REASON}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("name", "shape", "group_size", "dim", "make"), LAYOUTS, ids=[c[0] for c in LAYOUTS]
)
def test_cuda_groupsort_matches_reference(name, shape, group_size, dim, make, dtype):
    base = _input(shape, dtype, "special").cuda()
    x = make(base) if make else base
    grad = torch.randn(x.shape, device="cuda").to(dtype)
    assert _bits_equal(_cpp.groupsort(x, group_size, dim), reference.groupsort(x, group_size, dim))
    assert _bits_equal(
        _cpp.groupsort_backward(grad, x, group_size, dim),
        reference.groupsort_backward(grad, x, group_size, dim),
    )


@pytest.mark.gpu
@pytest.mark.skipif(GPU_REASON is not None, reason=f"cpp CUDA kernels unusable: {GPU_REASON}")
@pytest.mark.parametrize("shape", [*PI_SHAPES, (4096, 4096)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cuda_power_iteration_matches_reference(shape, dtype):
    w = torch.randn(shape).to(dtype)
    v = torch.randn(shape[1]).to(dtype)
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    expanded = w[:1].expand(shape)  # aliased rows (row stride 0)
    for weight in (w, expanded):
        got = _cpp.power_iteration(weight.cuda(), v.cuda(), 5)
        want = reference.power_iteration(weight.double().contiguous(), v.double(), 5)
        for g, e in zip(got, want, strict=True):
            torch.testing.assert_close(g.cpu().double(), e, rtol=rtol, atol=rtol)


@pytest.mark.gpu
@pytest.mark.skipif(GPU_REASON is not None, reason=f"cpp CUDA kernels unusable: {GPU_REASON}")
@pytest.mark.parametrize("needs", NEEDS, ids=["all", "x", "w", "b"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_lip_linear_matches_reference(dtype, needs):
    x, w, b, scale, u, v = _lip_problem(dtype, True, batch=65, shape=(48, 80))
    cuda = [t.cuda() for t in (x, w, b, scale, u, v)]
    out = _cpp.lip_linear(*cuda[:4])
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    want = reference.lip_linear(x.double(), w.double(), b.double(), scale.double())
    torch.testing.assert_close(out.cpu().double(), want, rtol=tol, atol=tol)
    grad = torch.randn(out.shape, dtype=dtype)
    got = _cpp.lip_linear_backward(grad.cuda(), *cuda[:3], out, *cuda[3:], 1.7, needs)
    d = [t.double() for t in (grad, x, w, b, out.cpu(), scale, u, v)]
    for g, e in zip(got, reference.lip_linear_backward(*d, 1.7, needs), strict=True):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g.cpu().double(), e, rtol=tol, atol=tol)
