"""lip_linear (the op) on every backend: forward and backward kernels against float64 oracles
(the reference, autograd of the naive formula k x W^T / (u^T W v) + b), every gradient layout
and `needs` combination, both Triton GEMM variants, double backward, opcheck and bad arguments.
The LipLinear layer itself: tests/test_lip_linear_layer.py."""

import pytest
import torch
from helpers import (
    TOLERANCE,
    assert_split,
    naive_lip_linear,
    needs_cpp,
    needs_interpreter,
    num_threads,
)
from torch.library import opcheck

import crvae_ext
import crvae_ext.functional as F
from crvae_ext import GroupSort, LipLinear, _backend, _cpp, ops, reference

if _backend.unusable_reason("triton", "cpu") is None:
    from crvae_ext._triton import kernels

    _triton = kernels.cublas

GPU_REASON = _backend.unusable_reason("cpp", "cuda") if torch.cuda.is_available() else "no CUDA"
DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CPU_BACKENDS = [b for b in crvae_ext.backends("cpu") if b != "triton"]


def test_scale_must_not_require_grad():
    w = torch.randn(3, 4)
    scale = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(ValueError, match="scale must be a 0-d tensor that does not require grad"):
        F.lip_linear(torch.randn(2, 4), w, None, scale, torch.randn(3), torch.randn(4), 1.0)


def test_argument_dtypes_and_devices():
    x, w, u, v = torch.randn(2, 4), torch.randn(3, 4), torch.randn(3), torch.randn(4)
    with pytest.raises(TypeError, match="scale must be a floating-point tensor"):
        F.lip_linear(x, w, None, torch.tensor(2), u, v, 1.0)
    with pytest.raises(TypeError, match="u must be a floating-point tensor"):
        F.lip_linear(x, w, None, torch.tensor(2.0), u.long(), v, 1.0)
    meta = torch.empty(3, device="meta")
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        F.lip_linear(x, w, meta, torch.tensor(2.0), u, v, 1.0)
    with pytest.raises(ValueError, match="v is on meta but x is on cpu"):
        F.lip_linear(x, w, None, torch.tensor(2.0), u, v.to("meta"), 1.0)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_torch(bias):
    w = torch.randn(6, 4, requires_grad=True)
    x = torch.randn(5, 4, requires_grad=True)
    b = torch.randn(6, requires_grad=True) if bias else None
    sigma, u, v = reference.power_iteration(w, torch.randn(4), 20)
    opcheck(ops.lip_linear, (x, w, b, 1.0 / sigma, u, v, 1.0, "torch"))


@pytest.mark.parametrize("bias", [True, False])
def test_analytic_backward_gradcheck(bias):
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True) if bias else None
    _, u, v = reference.power_iteration(w, torch.ones(7, dtype=torch.float64) / 7**0.5, 50)
    k = 1.7

    def f(x, w, b):
        scale = (k / torch.dot(u, w @ v)).detach()
        return F.lip_linear(x, w, b, scale, u, v, k, backend="torch")

    inputs = (x, w, b)
    assert torch.autograd.gradcheck(f, inputs)
    grad_out = torch.randn(6, 5, dtype=torch.float64)
    ours = torch.autograd.grad(f(*inputs), [t for t in inputs if t is not None], grad_out)
    naive = torch.autograd.grad(
        naive_lip_linear(x, w, b, u, v, k), [t for t in inputs if t is not None], grad_out
    )
    for a, e in zip(ours, naive, strict=True):
        assert torch.allclose(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("public_op", [False, True], ids=["functional", "public_op"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_gradgradcheck(backend, public_op):
    """Second derivatives (gradient penalties) through the op, any backend, vs finite
    differences of the whole formula (the scale is recomputed from W at every probe)."""
    torch.manual_seed(0)
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    _, u, v = reference.power_iteration(w, torch.ones(7, dtype=torch.float64) / 7**0.5, 50)

    def f(x, w, b):
        scale = (1.7 / torch.dot(u, w @ v)).detach()
        if public_op:
            return ops.lip_linear(x, w, b, scale, u, v, 1.7, backend)
        return F.lip_linear(x, w, b, scale, u, v, 1.7, backend=backend)

    assert torch.autograd.gradgradcheck(f, (x, w, b))


def _lib():
    return torch.ops.crvae_ext_cpp


def _lip_problem(dtype, bias: bool, batch: int = 9, shape=(7, 11)):
    w = torch.randn(shape, dtype=dtype)
    x = torch.randn(batch, shape[1], dtype=dtype)
    b = torch.randn(shape[0], dtype=dtype) if bias else None
    sigma, u, v = reference.power_iteration(w.double(), torch.randn(shape[1]).double(), 30)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return x, w, b, (1.7 / sigma).to(acc), u.to(acc), v.to(acc)


@needs_cpp
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpp_forward(dtype, bias):
    x, w, b, scale, _, _ = _lip_problem(dtype, bias)
    want = reference.lip_linear(x.double(), w.double(), None if b is None else b.double(), scale)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(_cpp.lip_linear(x, w, b, scale).double(), want, rtol=tol, atol=tol)
    strided = torch.randn(x.shape[1], x.shape[0], dtype=dtype).t().copy_(x)
    torch.testing.assert_close(
        _cpp.lip_linear(strided, w, b, scale), _cpp.lip_linear(x, w, b, scale)
    )


NEEDS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]


# (batch, weight shape): a batch larger than a narrow W (one GEMM each), and two the CPU kernel
# splits over the threads (csrc/gemm_split.h): by columns (a small batch), by rows
PROBLEMS = {"wide_batch": (33, (24, 40)), "columns": (3, (96, 130)), "rows": (70, (36, 40))}


@needs_cpp
@pytest.mark.parametrize("needs", NEEDS, ids=["all", "x", "w", "b"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("grad_kind", ["dense", "expanded", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("problem", PROBLEMS)
def test_cpp_backward_matches_reference(problem, dtype, grad_kind, bias, needs):
    batch, shape = PROBLEMS[problem]
    x, w, b, scale, u, v = _lip_problem(dtype, bias, batch=batch, shape=shape)
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


@needs_cpp
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, True), (True, True, False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("kind", ["columns", "rows"])
def test_cpp_backward_split_over_any_thread_count(kind, threads, dtype, needs):
    """The backward with its GEMMs split over 1, 2 or 3 threads (3: parts of unequal width)
    against the float64 reference."""
    batch, shape = {"columns": (2, (100, 131)), "rows": (100, (36, 40))}[kind]
    x, w, b, scale, u, v = _lip_problem(dtype, True, batch=batch, shape=shape)
    grad = torch.randn(x.shape[0], w.shape[0], dtype=dtype)
    d = [t.double() for t in (grad, x, w, b, _cpp.lip_linear(x, w, b, scale), scale, u, v)]
    want = reference.lip_linear_backward(*d, 1.7, needs)
    with num_threads(threads):
        assert_split(batch, min(shape), threads, kind)
        got = _cpp.lip_linear_backward(grad, x, w, b, None, scale, u, v, 1.7, needs)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    for g, e, wanted in zip(got, want, needs, strict=True):
        assert (g is not None) == wanted
        if wanted:
            torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol)


@needs_cpp
def test_cpp_backward_needs_y_without_grad_x():
    x, w, b, scale, u, v = _lip_problem(torch.float32, True)
    grad = torch.randn(x.shape[0], w.shape[0])
    with pytest.raises(RuntimeError, match="out is required"):
        _cpp.lip_linear_backward(grad, x, w, b, None, scale, u, v, 1.7, (False, True, False))


@needs_cpp
def test_cpp_large_bias_does_not_cancel():
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


@needs_cpp
@pytest.mark.parametrize("bias", [True, False])
def test_cpp_gradients_match_naive_formula(bias):
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


@needs_cpp
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("wants", [(1, 1, 1), (0, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1)])
def test_cpp_autograd_node_for_every_needs(bias, wants):
    """Plain eager on the cpp backend records its C++ node; every subset of (x, W, b) that needs
    a gradient (x without one: the saved y enters) against autograd of the naive formula."""
    if not bias and wants == (0, 0, 1):
        pytest.skip("no bias to differentiate")
    x, w, b, _, u, v = _lip_problem(torch.float64, bias)
    k = 1.7
    scale = (k / torch.dot(u, w @ v)).detach()
    for t, want in zip((x, w, b), wants, strict=True):
        if t is not None:
            t.requires_grad_(bool(want))
    out = F.lip_linear(x, w, b, scale, u, v, k, backend="cpp")
    assert type(out.grad_fn).__name__ == "CppFunction"
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    grad = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(naive_lip_linear(x, w, b, u, v, k), inputs, grad)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@needs_cpp
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("how", ["grad", "backward_inputs"])
def test_cpp_autograd_node_asked_for_the_weight_alone(bias, how):
    """x requires a gradient (so y is not saved) but this backward asks for W alone, as when
    only a decoder's parameters are differentiated: <G, y - b> still comes out right."""
    x, w, b, _, u, v = _lip_problem(torch.float64, bias)
    k = 1.7
    scale = (k / torch.dot(u, w @ v)).detach()
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(True)
    grad = torch.randn(x.shape[0], w.shape[0], dtype=torch.float64)
    out = F.lip_linear(x, w, b, scale, u, v, k, backend="cpp")
    if how == "grad":
        (got,) = torch.autograd.grad(out, [w], grad)
    else:
        out.backward(grad, inputs=[w])
        got = w.grad
        assert x.grad is None and (b is None or b.grad is None)
    (want,) = torch.autograd.grad(naive_lip_linear(x, w, b, u, v, k), [w], grad)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@needs_cpp
@pytest.mark.parametrize("x_grad", [True, False])
def test_cpp_autograd_node_double_backward(x_grad):
    """create_graph through the C++ node (its ATen formula) without a bias, with and without a
    gradient for x, against finite differences of the whole formula."""
    torch.manual_seed(1)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=x_grad)
    _, u, v = reference.power_iteration(w, torch.ones(6, dtype=torch.float64) / 6**0.5, 50)

    def f(*inputs):
        xx, ww = inputs if x_grad else (x, inputs[0])
        scale = (1.3 / torch.dot(u, ww @ v)).detach()
        return F.lip_linear(xx, ww, None, scale, u, v, 1.3, backend="cpp")

    assert torch.autograd.gradgradcheck(f, (x, w) if x_grad else (w,))


@needs_cpp
def test_opcheck_cpp_kernels():
    """The crvae_ext_cpp ops are the backend's kernels (no autograd of their own)."""
    x, w, b, scale, u, v = _lip_problem(torch.float32, True)
    opcheck(_lib().lip_linear.default, (x, w, b, scale))
    out = _cpp.lip_linear(x, w, b, scale)
    for needs in NEEDS:
        for bias in (b, None):
            args = (torch.randn(out.shape), x, w, bias, out, scale, u, v, 1.7, list(needs))
            opcheck(_lib().lip_linear_backward.default, args)


@needs_cpp
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_public_op_on_cpp(bias):
    x, w, b, scale, u, v = _lip_problem(torch.float32, bias)
    args = [t.requires_grad_(True) for t in (x, w)] + [b.requires_grad_(True) if bias else None]
    opcheck(ops.lip_linear, (*args, scale, u, v, 1.7, "cpp"))


@pytest.mark.gpu
@pytest.mark.skipif(GPU_REASON is not None, reason=f"cpp CUDA kernels unusable: {GPU_REASON}")
@pytest.mark.parametrize("needs", NEEDS, ids=["all", "x", "w", "b"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cpp_cuda_matches_reference(dtype, needs):
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


@pytest.fixture(params=["triton", "triton_gemm"])
def gemm(request):
    """Both LipLinear GEMM variants: torch.mm + fused epilogues ("triton"), Triton GEMMs with
    fused epilogues ("triton_gemm", which fp32 takes only with TF32 allowed: allowed here, and
    the interpreter computes its dots in fp32); the value is the backend name."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = request.param == "triton_gemm" or saved
    yield request.param
    torch.backends.cuda.matmul.allow_tf32 = saved


def _small_problem(batch, n, m, bias, dtype=torch.float32):
    w = torch.randn(m, n, dtype=dtype)
    sigma, u, v = reference.power_iteration(w, torch.randn(n, dtype=dtype), 50)
    b = torch.randn(m, dtype=dtype) if bias else None
    return torch.randn(batch, n, dtype=dtype), w, b, sigma, u, v


@needs_interpreter
@pytest.mark.parametrize("shape", [(5, 7, 6), (33, 40, 20), (70, 17, 40), (32, 48, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_matches_reference(gemm, shape, bias):
    """Odd shapes run the Triton GEMM variant through cuBLAS (its tiles would spill); sizes in
    multiples of 16 run the Triton GEMM itself."""
    x, w, b, sigma, u, v = _small_problem(*shape, bias)
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


@needs_interpreter
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(9, 12, 10), (16, 32, 16)])
@pytest.mark.parametrize("expanded", [True, False])
def test_triton_gradients_match_naive_formula(gemm, bias, shape, expanded):
    """Through F.lip_linear, with the stride-0 gradient of out.sum() and a dense one."""
    x, w, b, sigma, u, v = _small_problem(*shape, bias)
    k = 2.5
    leaves = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
    out = F.lip_linear(leaves[0], leaves[1], leaves[2] if bias else None, k / sigma, u, v, k,
                       backend=gemm)  # fmt: skip
    weights = torch.ones(out.shape[1]) if expanded else torch.linspace(-1, 1, out.shape[1])
    (out.sum(0) if expanded else (out * weights).sum(0)).sum().backward()
    exact = [t.detach().double().requires_grad_(True) for t in leaves]
    naive = naive_lip_linear(exact[0], exact[1], exact[2] if bias else None, u.double(),
                             v.double(), k)  # fmt: skip
    (naive * weights.double()).sum().backward()
    assert torch.allclose(out.double(), naive, rtol=1e-5, atol=1e-5)
    for got, want in zip(leaves, exact, strict=True):
        assert torch.allclose(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4)


@needs_interpreter
def test_opcheck_triton():
    xx, w, b, sigma, u, v = _small_problem(5, 4, 6, True)
    args = (xx.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 1.0 / sigma, u, v, 1.0)
    opcheck(
        ops.lip_linear,
        (*args, "triton"),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@needs_interpreter
def test_triton_training_matches_torch_backend():
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


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> bool:
    rtol, atol = TOLERANCE[dtype]
    return torch.allclose(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=atol * scale)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(256, 1024, 1024), (37, 100, 300), (1, 64, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_cuda_every_dtype(gemm, shape, dtype, bias):
    batch, n, m = shape
    w = torch.randn(m, n, device=DEVICE) / n**0.5
    sigma, u, v = reference.power_iteration(w, torch.randn(n, device=DEVICE), 30)
    k = 1.5
    x = torch.randn(batch, n, device=DEVICE)
    b = torch.randn(m, device=DEVICE) if bias else None
    leaves = [t.to(dtype).requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
    out = F.lip_linear(leaves[0], leaves[1], leaves[2] if bias else None, k / sigma, u, v, k,
                       backend=gemm)  # fmt: skip
    grad = torch.randn_like(out)
    out.backward(grad)
    exact = [t.detach().double().requires_grad_(True) for t in leaves]
    naive = naive_lip_linear(exact[0], exact[1], exact[2] if bias else None, u.double(),
                             v.double(), k)  # fmt: skip
    naive.backward(grad.double())
    assert _close(out, naive, dtype)
    for got, want in zip(leaves, exact, strict=True):
        assert _close(got.grad, want.grad, dtype, scale=max(1.0, batch**0.5))


@pytest.mark.gpu
def test_triton_cuda_opcheck():
    w = torch.randn(6, 4, device=DEVICE, requires_grad=True)
    sigma, u, v = reference.power_iteration(w, torch.randn(4, device=DEVICE), 20)
    for bias in (torch.randn(6, device=DEVICE, requires_grad=True), None):
        xx = torch.randn(5, 4, device=DEVICE, requires_grad=True)
        opcheck(ops.lip_linear, (xx, w, bias, 1.0 / sigma, u, v, 1.0, "triton"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_training_matches_torch_backend(dtype):
    losses = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            LipLinear(32, 64, lipschitz=2.0, backend=backend), GroupSort(4, backend=backend),
            LipLinear(64, 8, backend=backend),
        ).to(DEVICE, dtype)  # fmt: skip
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        x = torch.randn(128, 32, device=DEVICE, dtype=dtype)
        y = torch.randn(128, 8, device=DEVICE, dtype=dtype)
        losses[backend] = []
        for _ in range(30):
            loss = (net(x) - y).float().square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[backend].append(loss.item())
    rel = 1e-4 if dtype == torch.float32 else 5e-2
    assert losses["triton"] == pytest.approx(losses["torch"], rel=rel)
    assert losses["triton"][-1] < losses["triton"][0]
