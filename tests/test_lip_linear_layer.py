"""The LipLinear layer against float64 oracles: exact SVD, autograd of the naive formula, plain
nn.Linear; its eval state, state dict, export, transforms and bad arguments.
The op itself: tests/test_lip_linear.py."""

import copy
import io

import pytest
import torch
from helpers import (
    TOLERANCE,
    assert_split,
    lipschitz_ascent,
    naive_lip_linear,
    needs_cpp,
    num_threads,
)
from torch import nn

import crvae_ext
import crvae_ext.functional as F
from crvae_ext import LipLinear, ops, reference

SHAPES = {"square": (48, 48), "tall": (64, 24), "wide": (24, 64)}


def _gaussian_layer(shape, k, **kwargs) -> LipLinear:
    out_features, in_features = shape
    layer = LipLinear(in_features, out_features, lipschitz=k, **kwargs)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(shape))
    return layer


@pytest.mark.parametrize("k", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_spectral_converges_to_k_through_training_forwards(shape, k):
    layer = _gaussian_layer(shape, k)
    layer.v.normal_()  # forget the converged state: training forwards must get there
    x = torch.randn(4, shape[1])
    for _ in range(400):
        layer(x)
    layer.eval()
    exact = reference.spectral_norm_exact(layer.effective_weight())
    assert exact == pytest.approx(k, rel=1e-4)
    assert layer.lipschitz_bound() >= exact * (1 - 1e-6)


@pytest.mark.parametrize("k", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_converge_reaches_k(shape, k):
    layer = _gaussian_layer(shape, k).converge_().eval()
    assert reference.spectral_norm_exact(layer.effective_weight()) == pytest.approx(k, rel=1e-4)


@pytest.mark.parametrize("k", [0.5, 3.0])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_bjorck_singular_values_are_k(shape, k):
    layer = _gaussian_layer(shape, k, method="bjorck").converge_().eval()
    singular = torch.linalg.svdvals(layer.effective_weight().double())
    assert torch.allclose(singular, torch.full_like(singular, k), rtol=1e-4)


def test_fresh_layer_is_already_normalised():
    layer = LipLinear(40, 30, lipschitz=2.0).eval()
    assert reference.spectral_norm_exact(layer.effective_weight()) == pytest.approx(2.0, rel=1e-5)


CPU_BACKENDS = [b for b in crvae_ext.backends("cpu") if b != "triton"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_penalty_through_module_matches_naive_formula(backend):
    layer = _gaussian_layer((6, 9), 1.5, backend=backend).double()
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    gx.square().sum().backward()  # the penalty's gradient reaches W, b and x
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    (gx2,) = torch.autograd.grad(
        naive_lip_linear(x2, w, b, layer.u, layer.v, 1.5).square().sum(), x2, create_graph=True
    )
    expected = torch.autograd.grad(gx2.square().sum(), [x2, w, b])
    for got, e in zip((x.grad, layer.weight.grad, layer.bias.grad), expected, strict=True):
        torch.testing.assert_close(got, e, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("method", ["spectral", "bjorck"])
def test_module_gradients_match_naive_formula(method):
    layer = _gaussian_layer((12, 9), 2.0, method=method).double().converge_().eval()
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, layer.weight, layer.bias], grad_out)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    _, u, v = layer.normalization()
    if method == "spectral":
        expected_out = naive_lip_linear(x, w, b, u, v, 2.0)
    else:
        sigma = torch.dot(u, layer.weight.detach() @ v)
        expected_out = x @ (2.0 * F.bjorck(w / sigma, 20)).t() + b
    assert torch.allclose(out, expected_out, rtol=1e-10, atol=1e-12)
    expected = torch.autograd.grad(expected_out, [x, w, b], grad_out)
    for a, e in zip(got, expected, strict=True):
        assert torch.allclose(a, e, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["spectral", "bjorck"])
def test_ascent_never_exceeds_bound(method):
    layer = _gaussian_layer((20, 16), 1.5, method=method).double().converge_().eval()
    bound = layer.lipschitz_bound()
    found = lipschitz_ascent(layer, 16)
    assert found <= bound * (1 + 1e-9)
    assert found >= 0.99 * bound  # a single linear map: the ascent finds its norm


def test_training_advances_buffers_and_eval_does_not():
    layer = _gaussian_layer((16, 16), 1.0)
    layer.v.normal_()
    x = torch.randn(3, 16)
    before = layer.v.clone()
    layer(x)
    assert not torch.equal(layer.v, before)
    layer.eval()
    frozen = layer.v.clone()
    layer(x)
    assert torch.equal(layer.v, frozen)


def _eval_expected(layer: LipLinear, x: torch.Tensor) -> torch.Tensor:
    """The eval output from the current weight: k x W^T / |W|_2 + b (exact float64 norm)."""
    w = layer.weight.detach().double()
    sigma = reference.spectral_norm_exact(w)
    return (layer.lipschitz * x.double() @ w.t() / sigma + layer.bias.detach().double()).float()


def _assert_step_is_seen(layer: LipLinear, step) -> None:
    """The eval output before and after ``step`` (which changes the weight): recomputed."""
    x = torch.randn(5, 24)
    before = layer(x)
    step()
    after = layer(x)
    assert not torch.allclose(after, before, atol=1e-4)
    assert torch.allclose(after, _eval_expected(layer, x), atol=1e-5)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1),
        lambda p: torch.optim.Adam(p, lr=0.05),
        lambda p: torch.optim.Adam(p, lr=0.05, fused=True),
        lambda p: torch.optim.SGD(p, lr=0.1, fused=True),
    ],
    ids=["sgd", "adam", "fused_adam", "fused_sgd"],
)
def test_eval_cache_invalidated_by_optimizer_step(make_opt):
    """Any optimizer step after a backward, fused ones included (they bump no version)."""
    layer = _gaussian_layer((24, 24), 1.0).converge_().eval()
    opt = make_opt(layer.parameters())

    def step() -> None:
        (layer(torch.randn(5, 24)) * torch.randn(5, 24)).sum().backward()  # eval-mode backward
        opt.step()

    _assert_step_is_seen(layer, step)


def test_eval_cache_invalidated_by_a_step_with_assigned_gradients():
    layer = _gaussian_layer((24, 24), 1.0).converge_().eval()
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)

    def step() -> None:
        layer.weight.grad = torch.randn_like(layer.weight)
        layer.bias.grad = torch.zeros_like(layer.bias)
        opt.step()

    _assert_step_is_seen(layer, step)


def test_eval_cache_invalidated_by_load_and_inplace_edit():
    layer = _gaussian_layer((24, 24), 1.0).converge_().eval()
    x = torch.randn(5, 24)
    layer(x)
    with torch.no_grad():
        layer.weight.add_(0.3 * torch.randn_like(layer.weight))
    assert torch.allclose(layer(x), _eval_expected(layer, x), atol=1e-5)
    other = _gaussian_layer((24, 24), 1.0).converge_()
    layer.load_state_dict(other.state_dict())
    assert torch.allclose(layer(x), _eval_expected(layer, x), atol=1e-5)


@pytest.mark.parametrize("method", ["spectral", "bjorck"])
def test_state_dict_round_trip(method):
    a = _gaussian_layer((10, 12), 2.5, method=method)
    opt = torch.optim.SGD(a.parameters(), lr=0.01)
    for _ in range(3):
        a(torch.randn(4, 12)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    a.eval()
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = LipLinear(12, 10, lipschitz=1.0, method=method)
    b.load_state_dict(torch.load(buffer))
    b.eval()
    x = torch.randn(7, 12)
    assert b.lipschitz == 2.5
    assert torch.equal(a(x), b(x))
    assert b.lipschitz_bound() == a.lipschitz_bound()


def test_load_without_power_iteration_state_converges():
    linear = nn.Linear(20, 14)
    layer = LipLinear(20, 14, lipschitz=2.0)
    state = {k: v for k, v in linear.state_dict().items()}
    layer.load_state_dict(state, strict=False)
    layer.eval()
    assert reference.spectral_norm_exact(layer.effective_weight()) == pytest.approx(2.0, rel=1e-4)


@pytest.mark.parametrize("method", ["spectral", "bjorck"])
def test_to_linear_matches(method):
    layer = _gaussian_layer((9, 13), 0.7, method=method).converge_().eval()
    x = torch.randn(3, 5, 13)
    plain = layer.to_linear()
    assert type(plain) is nn.Linear
    assert torch.allclose(plain(x), layer(x), atol=1e-6)


def test_from_linear_keeps_direction():
    linear = nn.Linear(16, 8)
    layer = LipLinear.from_linear(linear, lipschitz=3.0).eval()
    x = torch.randn(4, 16)
    sigma = reference.spectral_norm_exact(linear.weight)
    expected = 3.0 * (x @ linear.weight.t()) / sigma + linear.bias
    assert torch.allclose(layer(x), expected, atol=1e-4)


def test_batched_input_and_no_bias():
    layer = LipLinear(6, 4, bias=False).eval()
    x = torch.randn(2, 3, 6)
    expected = x @ layer.effective_weight().t()
    assert layer(x).shape == (2, 3, 4)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert layer.bias is None


def test_bf16_applies_the_fp32_scale_unrounded():
    """k / sigma_hat is applied in fp32 (as the bound assumes), not rounded to bf16 first."""
    layer = LipLinear(64, 64, bias=False, lipschitz=1.3, dtype=torch.bfloat16).eval()
    x = torch.randn(256, 64, dtype=torch.bfloat16)
    scale, _, _ = layer.normalization()
    exact = x.double() @ layer.weight.double().t() * scale.double()
    with torch.no_grad():
        ratio = layer(x).double() / exact
    keep = exact.abs() > 0.1
    bias = float(ratio[keep].mean() - 1)
    assert abs(bias) < 4e-4  # rounding the scale 1.3 to bf16 biases every output by -2.4e-3


@pytest.mark.parametrize("method", ["spectral", "bjorck"])
def test_data_edit_keeps_bound_and_forward_together(method):
    layer = _gaussian_layer((12, 12), 1.0, method=method).double().converge_().eval()
    x, y = torch.randn(2, 12, dtype=torch.float64)
    layer(x)  # fills the eval cache
    with torch.no_grad():
        layer.weight.data.mul_(-0.5)  # invisible to version counters
    bound = layer.lipschitz_bound()
    assert (layer(x) - layer(y)).norm() <= bound * (x - y).norm() * (1 + 1e-12)


def test_eval_after_sign_flip_is_finite_and_bounded():
    layer = _gaussian_layer((10, 10), 2.0).double().converge_().eval()
    layer(torch.randn(3, 10, dtype=torch.float64))
    with torch.no_grad():
        layer.weight.copy_(-layer.weight)
    scale, _, _ = layer.normalization()
    assert 0 < float(scale) < 1e3
    assert layer.lipschitz_bound() == pytest.approx(2.0, rel=1e-3)


def test_zero_weight_does_not_kill_the_power_iteration():
    layer = _gaussian_layer((8, 8), 1.0)
    with torch.no_grad():
        layer.weight.zero_()
    layer(torch.randn(2, 8))  # sigma = 0: the state must survive
    assert float(layer.v.norm()) == pytest.approx(1.0)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(8, 8))
    layer.converge_().eval()
    assert reference.spectral_norm_exact(layer.effective_weight()) == pytest.approx(1.0, rel=1e-4)


def test_eval_after_a_weight_copy_has_norm_k():
    """An eval layer whose weight is replaced under no_grad normalises to exactly k again (one
    power-iteration step from the stale v gave |W_eff| = 2.86 for k = 2)."""
    layer = LipLinear(64, 32, lipschitz=2.0).eval()
    layer(torch.randn(3, 64))
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, 64))
    layer(torch.randn(3, 64))
    assert reference.spectral_norm_exact(layer.effective_weight()) == pytest.approx(2.0, rel=1e-5)
    assert reference.spectral_norm_exact(layer.to_linear().weight) <= layer.lipschitz_bound()


@pytest.mark.parametrize(("saved", "loading"), [("bjorck", "spectral"), ("spectral", "bjorck")])
def test_state_dict_of_another_method_is_refused(saved, loading):
    state = LipLinear(6, 5, method=saved).state_dict()
    layer = LipLinear(6, 5, method=loading)
    before = {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(RuntimeError, match=f"saved by a LipLinear with method='{saved}'"):
        layer.load_state_dict(state)
    for key, value in before.items():
        assert torch.equal(layer.state_dict()[key], value), key  # nothing was overwritten


def test_state_dict_of_other_bjorck_iterations_is_refused():
    state = LipLinear(6, 5, method="bjorck", bjorck_iterations=5).state_dict()
    with pytest.raises(RuntimeError, match="bjorck_iterations=5"):
        LipLinear(6, 5, method="bjorck").load_state_dict(state)


def test_lipschitz_the_dtype_cannot_hold_is_refused():
    with pytest.raises(ValueError, match=r"lipschitz=1e\+39 cannot be represented in float32"):
        LipLinear(4, 3, lipschitz=1e39)
    LipLinear(4, 3, lipschitz=1e39, dtype=torch.float64)  # fine in float64
    layer = LipLinear(4, 3, lipschitz=1e5)
    with pytest.raises(ValueError, match="cannot be represented in float16"):
        layer.half()
    assert layer.weight.dtype == torch.float32  # refused before anything was converted
    with pytest.raises(ValueError, match="cannot be represented in bfloat16"):
        LipLinear(4, 3, dtype=torch.bfloat16).lipschitz = 1e-39


@pytest.mark.parametrize("k", [0.7, 2.5, 1e3])
def test_bound_covers_the_exported_weights(k):
    """to_linear() rounds s W to the layer's dtype; that matrix's exact norm never exceeds the
    bound (it did by a few ulps: 2.5000006039 vs 2.5000005944)."""
    for seed in range(30):
        torch.manual_seed(seed)
        layer = _gaussian_layer((16, 32), k).converge_().eval()
        bound = layer.lipschitz_bound()
        assert reference.spectral_norm_exact(layer.to_linear().weight) <= bound
        w = layer.weight.detach().double() * layer.normalization()[0].double()
        assert reference.spectral_norm_exact(w) <= bound  # the eval map s W itself
        assert bound <= k * (1 + 1e-6)


@pytest.mark.parametrize("method", ["spectral", "bjorck"])
def test_inference_mode_does_not_poison_the_eval_state(method):
    layer = LipLinear(8, 6, method=method).eval()
    x = torch.randn(3, 8)
    with torch.inference_mode():
        expected = layer(x)
    x.requires_grad_(True)
    out = layer(x)
    out.sum().backward()  # saving the cached state for backward must work
    assert torch.allclose(out.detach(), expected) and x.grad is not None


def test_meta_device_layer_builds_and_materialises():
    layer = LipLinear(16, 8, lipschitz=2.0, device="meta")
    assert layer.weight.is_meta and layer(torch.empty(5, 16, device="meta")).shape == (5, 8)
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    layer.eval()
    assert reference.spectral_norm_exact(layer.effective_weight()) == pytest.approx(2.0, rel=1e-5)


def test_meta_layer_has_no_bound():
    with pytest.raises(ValueError, match="meta device"):
        LipLinear(4, 3, device="meta").lipschitz_bound()


@pytest.mark.parametrize("dtype", [torch.int64, "float32", torch.complex64])
def test_non_float_dtype_is_refused(dtype):
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch\.dtype"):
        LipLinear(4, 3, dtype=dtype)


ALL_CPU_BACKENDS = [b for b in crvae_ext.backends("cpu")]


@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_functorch_jacobian_of_eval_layer_is_the_exported_weight(backend):
    layer = _gaussian_layer((5, 7), 1.5, backend=backend).double().converge_().eval()
    plain = layer.to_linear()
    x = torch.randn(7, dtype=torch.float64)
    jacobian = torch.func.jacrev(layer)(x)
    torch.testing.assert_close(jacobian, plain.weight.detach(), rtol=1e-12, atol=1e-12)
    batch = torch.randn(3, 4, 7, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(layer)(batch), plain(batch).detach())
    per_input = torch.func.vmap(torch.func.jacrev(layer))(batch[0])
    torch.testing.assert_close(per_input, plain.weight.detach().expand(4, 5, 7))
    g = torch.func.grad(lambda t: layer(t).square().sum())(x)
    torch.testing.assert_close(g, 2 * plain.weight.detach().t() @ plain(x).detach())


@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_functorch_per_sample_weight_gradients(backend):
    """vmap(grad) over samples w.r.t. the weight (functional_call): the naive formula's."""
    layer = _gaussian_layer((4, 6), 2.0, backend=backend).double().converge_().eval()
    params = {"weight": layer.weight.detach(), "bias": layer.bias.detach()}
    xs = torch.randn(3, 6, dtype=torch.float64)

    def loss(p, x):
        return torch.func.functional_call(layer, p, (x,)).square().sum()

    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)["weight"]
    _, u, v = layer.normalization()
    for i in range(3):
        w = params["weight"].clone().requires_grad_(True)
        naive = naive_lip_linear(xs[i : i + 1], w, params["bias"], u, v, 2.0).square().sum()
        torch.testing.assert_close(got[i], torch.autograd.grad(naive, w)[0])


def test_functorch_leaves_training_buffers_alone():
    """Transforms need pure functions: a training forward inside one still takes its power
    step but does not write u, v."""
    layer = _gaussian_layer((5, 7), 1.0)
    layer.v.normal_()
    before = layer.v.clone()
    torch.func.jacrev(layer)(torch.randn(7))
    assert torch.equal(layer.v, before)
    layer(torch.randn(2, 7))
    assert not torch.equal(layer.v, before)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"lipschitz": 0.0}, ValueError, "lipschitz must be a finite number > 0"),
        ({"lipschitz": -1.0}, ValueError, "lipschitz must be a finite number > 0"),
        ({"lipschitz": float("nan")}, ValueError, "lipschitz must be a finite number > 0"),
        ({"lipschitz": float("inf")}, ValueError, "lipschitz must be a finite number > 0"),
        ({"lipschitz": "2"}, TypeError, "lipschitz must be a real number"),
        ({"n_power_iterations": 0}, ValueError, "n_power_iterations must be >= 1"),
        ({"bjorck_iterations": 0}, ValueError, "bjorck_iterations must be >= 1"),
        ({"method": "ortho"}, ValueError, "method must be one of"),
        ({"in_features": 0}, ValueError, "in_features must be >= 1"),
        ({"backend": "gpu"}, ValueError, "backend must be None"),
    ],
)
def test_liplinear_constructor(kwargs, exc, match):
    args = {"in_features": 4, "out_features": 3, **kwargs}
    with pytest.raises(exc, match=match):
        LipLinear(**args)


def test_lipschitz_setter_validates():
    layer = LipLinear(4, 3)
    with pytest.raises(ValueError, match="lipschitz must be a finite number > 0"):
        layer.lipschitz = -2.0
    assert layer.lipschitz == 1.0


@pytest.mark.parametrize("method", ["spectral", "bjorck"])
def test_liplinear_input_errors(method):
    """Clear errors naming x, and the power-iteration buffers untouched by a rejected call."""
    layer = LipLinear(4, 3, method=method)
    u, v = layer.u.clone(), layer.v.clone()
    with pytest.raises(ValueError, match="last dimension in_features=4, got shape \\(2, 5\\)"):
        layer(torch.randn(2, 5))
    with pytest.raises(TypeError, match=r"floating-point tensor, got dtype torch.int64"):
        layer(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(
        TypeError, match=r"x has dtype torch.float64 but weight has dtype torch.float32"
    ):
        layer(torch.randn(2, 4, dtype=torch.float64))
    assert torch.equal(layer.u, u) and torch.equal(layer.v, v)


def test_training_forward_traces_with_make_fx():
    """A train-mode forward under a dispatch mode (make_fx) updates its buffers without reading
    sigma on the host (the CPU fast path is for plain eager calls)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    layer = LipLinear(6, 4)
    x = torch.randn(3, 6)
    graph = make_fx(lambda t: layer(t), tracing_mode="real")(x)
    assert any(n.op == "call_function" for n in graph.graph.nodes)


def _counting_fused_calls(monkeypatch) -> list[int]:
    """Completed calls of the backend's fused training forward from here on, one entry each
    (a call whose argument check raises, or that returns None, for the Python path to take
    over, is not counted)."""
    calls: list[int] = []
    real = ops.eager_entry

    def spy(name: str, backend: str):
        found = real(name, backend)
        if name != "lip_linear_train" or found is None:
            return found

        def counted(*args):
            out = found(*args)
            if out is not None:
                calls.append(1)
            return out

        return counted

    monkeypatch.setattr(ops, "eager_entry", spy)
    return calls


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(12,), (4, 12), (2, 5, 12)])
@pytest.mark.parametrize("strided", [False, True], ids=["dense_buffers", "strided_buffers"])
def test_fused_training_forward_equals_the_python_path(dtype, bias, shape, strided, monkeypatch):
    """The cpp backend's one-call training forward (lip_linear_train, taken in plain eager
    mode) against the layer's Python path (_iterate, then F.lip_linear) from the same state,
    over five SGD steps: outputs, gradients, the buffers bit for bit and their versions."""
    torch.manual_seed(0)
    fused = LipLinear(12, 7, bias=bias, lipschitz=2.5, n_power_iterations=2, backend="cpp",
                      dtype=dtype)  # fmt: skip
    if strided:  # buffers the kernel cannot write directly
        fused.u = torch.zeros(14, dtype=dtype)[::2].copy_(fused.u)
        fused.v = torch.zeros(24, dtype=dtype)[::2].copy_(fused.v)
    plain = copy.deepcopy(fused)
    versions = [(m.u._version, m.v._version) for m in (fused, plain)]
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (fused, plain)]
    calls = _counting_fused_calls(monkeypatch)

    def python_path():
        return F.lip_linear(x, plain.weight, plain.bias, *plain._iterate(), 2.5, "cpp")

    for step in range(5):
        out_fused = fused(x)
        out_plain = python_path()
        assert calls == [1] * (step + 1)  # the fused path ran for the layer, not for F
        outs = [out_fused, out_plain]
        assert torch.equal(outs[0], outs[1]), step
        grads = []
        for out, opt, module in zip(outs, opts, (fused, plain), strict=True):
            opt.zero_grad()
            grads.append(torch.autograd.grad(out.square().sum(), [x, *module.parameters()]))
            for p, g in zip(module.parameters(), grads[-1][1:], strict=True):
                p.grad = g
            opt.step()
        for a, b in zip(*grads, strict=True):
            assert torch.equal(a, b), step
        for a, b in zip(
            (fused.weight, fused.u, fused.v), (plain.weight, plain.u, plain.v), strict=True
        ):
            assert torch.equal(a, b), step
        assert fused.u.stride() == plain.u.stride() == ((2,) if strided else (1,))
        steps = [
            (m.u._version - u0, m.v._version - v0)
            for m, (u0, v0) in zip((fused, plain), versions, strict=True)
        ]
        assert steps[0] == steps[1] == (step + 1, step + 1), step


# (batch, in, out): a batch small next to W (the GEMM's columns split over the threads) and a
# larger one (its rows split), csrc/gemm_split.h
SPLITS = {"columns": (3, 130, 96), "rows": (100, 40, 36)}


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n_iters", [1, 40])
@pytest.mark.parametrize("split", SPLITS)
def test_fused_training_forward_split_over_threads(
    split, n_iters, threads, bias, dtype, monkeypatch
):
    """The cpp one-call training forward with its GEMM split over the threads, one of them
    running the power iteration first (csrc/lip_linear_train.cpp), on 1, 2 or 3 threads: 40
    steps leave the other parts done before the scale is known. Output, buffers and gradients
    against the float64 power iteration and autograd of the naive formula."""
    torch.manual_seed(0)
    batch, n_in, n_out = SPLITS[split]
    layer = LipLinear(n_in, n_out, bias=bias, lipschitz=2.5, n_power_iterations=n_iters,
                      backend="cpp", dtype=dtype)  # fmt: skip
    v0 = layer.v.clone()
    x = torch.randn(batch, n_in, dtype=dtype, requires_grad=True)
    calls = _counting_fused_calls(monkeypatch)
    with num_threads(threads):
        assert_split(batch, n_out, threads, split)
        out = layer(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    assert calls == [1]
    w = layer.weight.detach().double()
    _, u, v = reference.power_iteration(w, v0.double(), n_iters)
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else TOLERANCE[dtype]
    tol = {"rtol": rtol, "atol": atol}
    torch.testing.assert_close(layer.u.double(), u, **tol)
    torch.testing.assert_close(layer.v.double(), v, **tol)
    leaves = [t.detach().double().requires_grad_() for t in (x, *layer.parameters())]
    want = naive_lip_linear(leaves[0], leaves[1], leaves[2] if bias else None, u, v, 2.5)
    torch.testing.assert_close(out.double(), want, **tol)
    want_grads = torch.autograd.grad(want.square().sum(), leaves)
    for g, e in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g.double(), e, **tol)


@needs_cpp
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("split", SPLITS)
def test_fused_training_forward_split_with_a_zero_scale(split, threads):
    """Weights whose sigma is beyond float32's range give the scale 0 and y = bias on every
    thread count, as the unsplit GEMM with alpha = 0 does (x W^T itself overflows to inf)."""
    torch.manual_seed(0)
    batch, n_in, n_out = SPLITS[split]
    layer = LipLinear(n_in, n_out, backend="cpp")
    with torch.no_grad():
        w = layer.weight.double()
        layer.weight.copy_(w * (3e38 / w.abs().max()))  # finite, sigma about 8e38
    x = torch.randn(batch, n_in)
    with num_threads(threads):
        out = layer(x)
    assert torch.equal(out, layer.bias.detach().expand(batch, n_out))


@needs_cpp
def test_fused_training_forward_keeps_a_zero_weights_state(monkeypatch):
    """A zero weight (sigma = 0) leaves the buffers as they were and gives a finite scale on
    the fused path, as on the Python path."""
    layer = LipLinear(5, 3, backend="cpp")
    with torch.no_grad():
        layer.weight.zero_()
    u, v = layer.u.clone(), layer.v.clone()
    calls = _counting_fused_calls(monkeypatch)
    out = layer(torch.randn(4, 5))
    assert calls == [1] and torch.equal(layer.u, u) and torch.equal(layer.v, v)
    assert torch.equal(out, layer.bias.detach().expand(4, 3))


@needs_cpp
def test_fused_training_forward_falls_back_where_the_python_path_applies(monkeypatch):
    """Overridden Python steps, a buffer on another device, a bad step count: the Python path
    runs (with its override, or its clear error); under no_grad the fused path runs, graphless."""
    calls = _counting_fused_calls(monkeypatch)
    x = torch.randn(4, 12)

    steps = []

    class Counted(LipLinear):
        def _scale(self, sigma):
            steps.append(1)
            return super()._scale(sigma)

    Counted(12, 7, backend="cpp")(x)
    layer = LipLinear(12, 7, backend="cpp")
    layer(x)
    assert steps == [1]
    assert calls == [1]  # the plain layer only
    layer.v = torch.empty(12, device="meta")
    with pytest.raises(ValueError, match="v is on meta but weight is on cpu"):
        layer(x)
    layer = LipLinear(12, 7, backend="cpp")
    layer.n_power_iterations = 0
    with pytest.raises(ValueError, match="n_iters must be >= 1"):
        layer(x)
    assert calls == [1]
    layer.n_power_iterations = 1
    with torch.no_grad():
        out = layer(x)
    assert out.grad_fn is None and calls == [1, 1]
