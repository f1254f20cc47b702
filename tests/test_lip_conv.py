"""LipConv2d / LipConvTranspose2d and the convolution bounds, against dense float64 operators.

The oracle of every norm is the operator materialised from torch's own conv2d /
conv_transpose2d on the identity basis (exact in float64) and its LAPACK SVD.
"""

import math

import pytest
import torch
from helpers import needs_cpp, needs_interpreter
from torch import nn
from torch.nn import functional as tf

from crvae_ext import GroupSort, LipConv2d, LipConvTranspose2d, LipLinear, lipschitz_bound
from crvae_ext.conv_bounds import (
    ConvGeometry,
    conv_operator_bound,
    gram_bound,
    kernel_difference_bound,
)

F64 = torch.float64


def dense(fn, shape):
    """The matrix of the linear map ``fn`` on inputs of ``shape`` (C, H, W), float64."""
    n = shape[0] * shape[1] * shape[2]
    basis = torch.eye(n, dtype=F64).reshape(n, *shape)
    with torch.no_grad():
        return fn(basis).reshape(n, -1).T


def norm(matrix):
    return float(torch.linalg.matrix_norm(matrix, ord=2))


def conv_map(kernel, g):
    """torch's conv2d with geometry ``g``: the operator the bound describes."""

    def fn(x):
        if g.padding_mode == "circular":
            ph, pw = g.padding
            x = tf.pad(x, (pw, pw, ph, ph), mode="circular")
            return tf.conv2d(x, kernel, stride=g.stride, dilation=g.dilation)
        return tf.conv2d(x, kernel, stride=g.stride, padding=g.padding, dilation=g.dilation)

    return fn


# (c_in, c_out, kernel, stride, padding, dilation, mode, input size)
GEOMETRIES = [
    (3, 4, 3, 1, 1, 1, "zeros", (8, 8)),
    (3, 4, 3, 1, 0, 1, "zeros", (7, 9)),
    (2, 3, 4, 2, 1, 1, "zeros", (9, 8)),
    (2, 3, 3, 2, 1, 1, "zeros", (7, 7)),
    (2, 2, 3, 1, 2, 2, "zeros", (7, 6)),
    (2, 5, 5, 3, 0, 1, "zeros", (11, 11)),
    (3, 2, (3, 5), (1, 2), (1, 2), 1, "zeros", (6, 9)),
    (1, 4, 2, 2, 0, 1, "zeros", (6, 6)),
    (4, 2, 3, 1, 1, 1, "circular", (8, 8)),
    (4, 2, 3, 1, 1, 2, "circular", (9, 9)),
    (2, 3, 4, 2, 1, 1, "circular", (8, 8)),
    (2, 3, 3, 2, 1, 1, "circular", (7, 7)),
    (2, 3, (3, 1), (1, 1), (1, 0), 1, "circular", (6, 5)),
]


@pytest.mark.parametrize(
    "case", GEOMETRIES, ids=lambda c: f"{c[6]}-k{c[2]}-s{c[3]}-p{c[4]}-d{c[5]}"
)
@pytest.mark.parametrize("method", ["svd", "gram"])
def test_bound_is_above_the_dense_operator_norm(case, method):
    c_in, c_out, k, s, p, d, mode, size = case
    g = ConvGeometry.of(k, s, p, d, mode)
    kernel = torch.randn(c_out, c_in, *g.kernel_size, dtype=F64)
    exact = norm(dense(conv_map(kernel, g), (c_in, *size)))
    bound = conv_operator_bound(kernel, size, g, method)
    assert bound >= exact
    assert bound <= 1.6 * exact  # a bound, but not a vacuous one
    exact_case = mode == "circular" and all(
        n % st == 0 for n, st in zip(size, g.stride, strict=True)
    )
    if exact_case and all(
        2 * pp == dd * (kk - 1)
        for pp, dd, kk in zip(g.padding, g.dilation, g.kernel_size, strict=True)
    ):
        assert bound <= exact * (1 + 1e-9)  # a circulant: the bound is its norm


@pytest.mark.parametrize("n", [6, 12, 20])
def test_zero_padding_bound_tightens_with_the_input_size(n):
    g = ConvGeometry.of(3, 1, 1)
    kernel = torch.randn(2, 2, 3, 3, dtype=F64)
    exact = norm(dense(conv_map(kernel, g), (2, n, n)))
    bound = conv_operator_bound(kernel, (n, n), g)
    assert exact <= bound <= exact * (1 + 2.0 / n)


def test_gram_bound_is_sound_and_close_on_random_matrices():
    a = torch.randn(50, 12, 7, dtype=torch.complex128)
    a[0] *= 1e-200  # scaled far from 1: the normalisation keeps it finite
    exact = torch.linalg.matrix_norm(a, ord=2)
    for i in range(len(a)):
        g = gram_bound(a[i : i + 1], 10)
        assert exact[i] <= g <= exact[i] * 1.01
    assert gram_bound(a, 3) >= float(exact.max())


def test_kernel_difference_bound_covers_the_operator():
    for mode, s in (("zeros", 1), ("zeros", 2), ("circular", 1)):
        g = ConvGeometry.of(3, s, 1, 1, mode)
        kernel = torch.randn(3, 2, 3, 3, dtype=F64)
        assert kernel_difference_bound(kernel) >= norm(dense(conv_map(kernel, g), (2, 6, 6)))


@pytest.mark.parametrize(
    ("kwargs", "size", "match"),
    [
        ({"padding_mode": "circular", "padding": 2}, (8, 8), "repeats rows"),
        ({"padding_mode": "reflect"}, (8, 8), "padding_mode must be one of"),
        ({"padding": "same"}, (8, 8), "padding='same'"),
        ({"kernel_size": 7}, (3, 3), "too small"),
        ({"stride": 0}, (8, 8), "stride must be >= 1"),
    ],
)
def test_unsupported_geometries_are_errors(kwargs, size, match):
    args = {"kernel_size": 3, "padding": 1} | kwargs
    with pytest.raises(ValueError, match=match):
        LipConv2d(2, 2, input_size=size, **args)


def test_layer_argument_errors():
    with pytest.raises(ValueError, match="backend must be None or 'torch'"):
        LipConv2d(2, 2, 3, backend="triton")
    with pytest.raises(ValueError, match="output_padding"):
        LipConvTranspose2d(2, 2, 3, stride=2, output_padding=2)
    with pytest.raises(ValueError, match="padding_mode='zeros' only"):
        LipConvTranspose2d(2, 2, 3, padding_mode="circular")
    with pytest.raises(ValueError, match="lipschitz"):
        LipConv2d(2, 2, 3, lipschitz=0.0)
    with pytest.raises(ValueError, match="input size is not known"):
        LipConv2d(2, 2, 3).lipschitz_bound()
    layer = LipConv2d(2, 3, 3, padding=1)
    with pytest.raises(ValueError, match=r"shape \(N, 2, H, W\)"):
        layer(torch.randn(4, 3, 5, 5))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(1, 2, 5, 5, dtype=F64))


LAYERS = [
    (LipConv2d, {"kernel_size": 3, "padding": 1}, (8, 8)),
    (LipConv2d, {"kernel_size": 4, "stride": 2, "padding": 1}, (10, 10)),
    (LipConv2d, {"kernel_size": 3, "padding": 2, "dilation": 2}, (7, 7)),
    (LipConv2d, {"kernel_size": 3, "padding": 1, "padding_mode": "circular"}, (8, 8)),
    (LipConvTranspose2d, {"kernel_size": 4, "stride": 2, "padding": 1}, (5, 5)),
    (
        LipConvTranspose2d,
        {"kernel_size": 3, "stride": 2, "padding": 1, "output_padding": 1},
        (4, 5),
    ),
]
LAYER_IDS = [f"{c.__name__}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for c, kw, _ in LAYERS]


def layer_map(plain):
    """The plain layer's linear part (its output minus the bias) as a function."""
    return lambda x: plain(x) - (0 if plain.bias is None else plain.bias.view(1, -1, 1, 1))


@pytest.mark.parametrize(("cls", "kwargs", "size"), LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_eval_norm_is_k_and_below_the_bound(cls, kwargs, size, dtype):
    layer = cls(3, 4, lipschitz=2.5, input_size=size, dtype=dtype, **kwargs).eval()
    plain = layer.to_plain()
    x = torch.randn(2, 3, *size, dtype=dtype)
    assert torch.equal(layer(x), plain(x))
    true = norm(dense(layer_map(plain.double()), (3, *size)))
    assert abs(true - 2.5) <= 0.01 * 2.5  # the power iteration ran on the operator itself
    bound = layer.lipschitz_bound()
    assert true <= bound
    assert true <= layer.lipschitz_bound("gram")


@pytest.mark.parametrize(("cls", "kwargs", "size"), LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("bias", [True, False])
def test_training_gradients_match_plain_autograd(cls, kwargs, size, bias):
    layer = cls(3, 4, lipschitz=1.7, input_size=size, bias=bias, dtype=F64, **kwargs)
    x = torch.randn(3, 3, *size, dtype=F64, requires_grad=True)
    y = layer(x)  # one power step: the buffers now hold this forward's (u, v)
    u, v, w = layer.u, layer.v, layer.weight

    def conv_with(weight, inp):
        kind = tf.conv_transpose2d if layer.transposed else tf.conv2d
        g = layer.geometry
        if g.padding_mode == "circular":
            ph, pw = g.padding
            inp = tf.pad(inp, (pw, pw, ph, ph), mode="circular")
            return kind(inp, weight, stride=g.stride, dilation=g.dilation)
        extra = {"output_padding": layer.output_padding} if layer.transposed else {}
        return kind(inp, weight, stride=g.stride, padding=g.padding, dilation=g.dilation, **extra)

    sigma = (u * conv_with(w, v)).sum()
    expected = conv_with(w * (1.7 / sigma), x)
    if bias:
        expected = expected + layer.bias.view(1, -1, 1, 1)
    assert torch.allclose(y, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(y)
    params = [x, w] + ([layer.bias] if bias else [])
    got = torch.autograd.grad(y, params, grad)
    want = torch.autograd.grad(expected, params, grad)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("cls", "kwargs", "size"), LAYERS[:2] + LAYERS[4:5], ids=LAYER_IDS[:2] + LAYER_IDS[4:5]
)
def test_training_keeps_the_norm_near_k_and_below_the_bound(cls, kwargs, size):
    torch.manual_seed(1)
    layer = cls(2, 3, lipschitz=1.0, input_size=size, **kwargs)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    x = torch.randn(16, 2, *size)
    target = torch.randn_like(layer(x))
    for _ in range(30):
        loss = (layer(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()
    true = norm(dense(layer_map(layer.to_plain().double()), (2, *size)))
    assert abs(true - 1.0) <= 0.01
    assert true <= layer.lipschitz_bound()


def test_power_iteration_is_a_lower_bound_that_converges():
    layer = LipConv2d(2, 3, 3, padding=1, input_size=(6, 6), dtype=F64)
    exact = norm(dense(conv_map(layer.weight.detach(), layer.geometry), (2, 6, 6)))
    sigma = float(layer._converged(layer.v, tol=1e-14)[0])
    assert sigma <= exact * (1 + 1e-12)
    assert sigma >= exact * (1 - 1e-6)


def test_state_dict_round_trip_into_a_fresh_layer():
    layer = LipConv2d(2, 3, 3, stride=2, padding=1, lipschitz=3.0)
    x = torch.randn(2, 2, 9, 9)
    layer(x)
    layer.eval()
    fresh = LipConv2d(2, 3, 3, stride=2, padding=1)
    fresh.load_state_dict(layer.state_dict())
    fresh.eval()
    assert fresh.input_size == (9, 9) and fresh.lipschitz == 3.0
    assert torch.equal(fresh(x), layer(x))
    assert fresh.lipschitz_bound() == layer.lipschitz_bound()


def test_input_sizes():
    layer = LipConv2d(2, 2, 3, padding=1).eval()
    assert layer.input_size is None
    layer(torch.randn(1, 2, 8, 8))
    assert layer.input_size == (8, 8)
    small = torch.randn(1, 2, 5, 7)  # zero padding: a restriction of the 8 x 8 operator
    assert torch.equal(layer(small), layer.to_plain()(small))
    with pytest.raises(ValueError, match=r"bounded for \(8, 8\) inputs"):
        layer(torch.randn(1, 2, 9, 8))
    circular = LipConv2d(2, 2, 3, padding=1, padding_mode="circular", input_size=8)
    with pytest.raises(ValueError, match="bounded for"):
        circular(torch.randn(1, 2, 6, 6))
    unbatched = torch.randn(2, 8, 8)
    assert torch.equal(layer(unbatched), layer(unbatched[None])[0])


def test_smaller_inputs_stay_below_the_bound():
    layer = LipConv2d(2, 3, 3, stride=2, padding=1, input_size=(9, 9), dtype=F64).eval()
    small = norm(dense(layer_map(layer.to_plain()), (2, 6, 5)))
    assert small <= layer.lipschitz_bound()


def test_sequential_stack_bound_covers_an_ascent():
    torch.manual_seed(3)
    net = (
        nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            LipConv2d(1, 4, 3, padding=1, lipschitz=1.5, input_size=8),
            GroupSort(2, dim=1),
            LipConv2d(4, 4, 4, stride=2, padding=1, lipschitz=1.2, input_size=8),
            nn.Flatten(),
            LipLinear(64, 5, lipschitz=0.8),
        )
        .double()
        .eval()
    )
    bound = lipschitz_bound(net)
    parts = [lipschitz_bound(m) for m in net]
    assert bound == pytest.approx(parts[0] * parts[1] * parts[2] * parts[3] * parts[4] * parts[5])
    x = torch.randn(16, 64, dtype=F64, requires_grad=True)
    y = (x.detach() + 0.1 * torch.randn_like(x)).requires_grad_(True)
    opt = torch.optim.Adam([x, y], lr=0.02)
    best = 0.0
    for _ in range(150):
        ratio = (net(x) - net(y)).norm(dim=1) / (x - y).norm(dim=1)
        best = max(best, float(ratio.detach().max()))
        x.grad, y.grad = torch.autograd.grad(-ratio.sum(), (x, y))
        opt.step()
    assert 0.3 * bound < best <= bound


BACKENDS = [
    pytest.param("torch"),
    pytest.param("cpp", marks=needs_cpp),
    pytest.param("triton", marks=needs_interpreter),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_size", [2, 4])
def test_groupsort_over_channels_nchw(backend, group_size):
    x = torch.randn(3, 8, 5, 4, requires_grad=True)
    out = GroupSort(group_size, dim=1, backend=backend)(x)
    expected = x.unflatten(1, (-1, group_size)).sort(dim=2).values.flatten(1, 2)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    assert torch.equal(
        torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(expected, x, grad)[0]
    )
    channels_last = x.detach().to(memory_format=torch.channels_last)
    assert torch.equal(GroupSort(group_size, dim=1, backend=backend)(channels_last), expected)


@pytest.mark.gpu
@pytest.mark.parametrize(("cls", "kwargs", "size"), LAYERS, ids=LAYER_IDS)
def test_cuda_layer_matches_the_cpu_layer(cls, kwargs, size):
    """The same layer on CUDA (cuDNN's convolutions): outputs, gradients and bound as on CPU."""
    cpu = cls(3, 4, lipschitz=1.3, input_size=size, dtype=F64, **kwargs)
    gpu = cls(3, 4, lipschitz=1.3, input_size=size, dtype=F64, **kwargs)
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    x = torch.randn(5, 3, *size, dtype=F64)
    for layer in (cpu, gpu):
        layer.train()
    y_cpu = cpu(x.requires_grad_(True))
    x_gpu = x.detach().cuda().requires_grad_(True)
    y_gpu = gpu(x_gpu)
    assert torch.allclose(y_gpu.cpu(), y_cpu, rtol=1e-10, atol=1e-12)
    grad = torch.randn_like(y_cpu)
    g_cpu = torch.autograd.grad(y_cpu, (x, cpu.weight), grad)
    g_gpu = torch.autograd.grad(y_gpu, (x_gpu, gpu.weight), grad.cuda())
    for a, b in zip(g_cpu, g_gpu, strict=True):
        assert torch.allclose(b.cpu(), a, rtol=1e-9, atol=1e-11)
    gpu.eval()
    true = norm(dense(layer_map(gpu.to_plain().cpu()), (3, *size)))
    assert abs(true - 1.3) <= 0.013 and true <= gpu.lipschitz_bound()


def test_frequency_matrices_error_bound_holds_for_long_kernels():
    """The computed A(f) against A(f) in 40-digit arithmetic (mpmath), for a dilated kernel
    whose phases f t run far past N: the returned bound covers the difference."""
    mpmath = pytest.importorskip("mpmath")
    from crvae_ext.conv_bounds import frequency_matrices, phase_kernel

    mpmath.mp.dps = 40
    g = ConvGeometry.of(3, 1, 20, 20)
    kernel = torch.zeros(1, 1, 3, 3, dtype=F64)
    kernel[0, 0, 2, 2] = 1.0  # one far tap: A(f) is a twiddle, its error the twiddle's own
    phased, grid = phase_kernel(kernel, g, (40, 40))
    a, err = frequency_matrices(phased, grid)
    taps = [(h, w, float(phased[0, 0, h, w])) for h in range(phased.shape[2])
            for w in range(phased.shape[3]) if phased[0, 0, h, w] != 0]  # fmt: skip
    worst = 0.0
    for index in range(a.shape[0]):
        fh, fw = divmod(index, grid[1] // 2 + 1)
        exact = mpmath.mpc(0)
        for h, w, value in taps:
            turns = mpmath.mpf(fh * h) / grid[0] + mpmath.mpf(fw * w) / grid[1]
            exact += value * mpmath.expj(-2 * mpmath.pi * turns)
        got = a[index, 0, 0]
        worst = max(worst, float(abs(mpmath.mpc(got.real.item(), got.imag.item()) - exact)))
    assert worst <= err


def test_bound_holds_for_subnormal_kernels():
    """Scaled into the normal range first: a kernel of subnormal entries is bounded as the same
    kernel scaled up by an exact power of two."""
    torch.manual_seed(1)
    g = ConvGeometry.of((1, 5), 1, (0, 2), 1, "circular")
    for trial in range(150):
        exponent = -1034 + trial % 12
        tiny = torch.ldexp(torch.randn(1, 1, 1, 5, dtype=F64), torch.tensor(exponent))
        exact = norm(dense(conv_map(torch.ldexp(tiny, torch.tensor(-exponent)), g), (1, 1, 7)))
        assert math.ldexp(conv_operator_bound(tiny, (1, 7), g), -exponent) >= exact


def test_a_zero_operator_is_refused():
    with pytest.raises(ValueError, match="every tap of every output reads the zero padding"):
        LipConv2d(2, 2, 1, stride=3, padding=2, input_size=(1, 1))
