"""The lip_conv2d op: a convolution (plain or transposed) with its kernel scaled by
k / sigma_hat, the power iteration on the convolution operator itself, and the analytic backward.

One backend: PyTorch's convolution kernels (``aten.convolution`` and its backward), which are
what a fused kernel would call too. Inputs with circular padding arrive padded (padding 0 here).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from ._meta import accumulate_dtype

_EPS = 1e-12


class ConvSpec(NamedTuple):
    """The convolution's arguments as ``aten.convolution`` takes them (groups = 1)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    transposed: bool
    output_padding: tuple[int, int]


def convolve(x: torch.Tensor, weight: torch.Tensor, spec: ConvSpec, bias=None) -> torch.Tensor:
    """The operator A applied to ``x`` (N x C x H x W): conv2d or conv_transpose2d."""
    return torch.ops.aten.convolution(
        x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.transposed,
        spec.output_padding, 1,
    )  # fmt: skip


def adjoint(y: torch.Tensor, weight: torch.Tensor, spec: ConvSpec, size: tuple[int, int]):
    """A^T y, shaped like A's input of spatial ``size``: the other of conv / conv_transpose,
    with the output padding that restores ``size`` (the last rows a stride skips get 0)."""
    k = weight.shape[2:]
    if spec.transposed:
        return convolve(y, weight, spec._replace(transposed=False, output_padding=(0, 0)))
    full = tuple(
        (o - 1) * s - 2 * p + d * (kk - 1) + 1
        for o, s, p, d, kk in zip(
            y.shape[2:], spec.stride, spec.padding, spec.dilation, k, strict=True
        )
    )
    extra = tuple(n - f for n, f in zip(size, full, strict=True))  # in [0, stride)
    return convolve(y, weight, spec._replace(transposed=True, output_padding=extra))


def weight_gradient(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, spec: ConvSpec):
    """d <grad, A_K x> / dK: the convolution's weight gradient."""
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, spec.stride, spec.padding, spec.dilation, spec.transposed,
        spec.output_padding, 1, [False, True, False],
    )[1]  # fmt: skip


def scaled_kernel(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """s K rounded once to the weight's dtype (the product taken in the accumulation dtype):
    the kernel the forward applies and the layer exports."""
    acc = accumulate_dtype(weight.dtype)
    return (weight.to(acc) * scale.to(acc)).to(weight.dtype)


class _LipConv2d(torch.autograd.Function):
    """y = A_(s K) x + b with s = k / sigma, sigma = <u, A_K v> (u, v held constant).

    dK = s G_K - (s^2 / k) <G_K, K> W(v, u), G_K the convolution's weight gradient at s K and
    W(v, u) = d sigma / dK, the weight gradient of the batch-1 pair: no normalised kernel beyond
    the scaled copy the convolution itself runs on.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, u, v, lipschitz, spec):
        w_eff = scaled_kernel(weight, scale)
        ctx.save_for_backward(x, weight, w_eff, scale, u, v)
        ctx.lipschitz, ctx.spec, ctx.has_bias = lipschitz, spec, bias is not None
        return convolve(x, w_eff, spec, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, w_eff, scale, u, v = ctx.saved_tensors
        spec = ctx.spec
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad.contiguous(), x, w_eff, [w_eff.shape[1] if spec.transposed else w_eff.shape[0]],
            spec.stride, spec.padding, spec.dilation, spec.transposed, spec.output_padding, 1,
            [need_x, need_w, need_b and ctx.has_bias],
        )  # fmt: skip
        if need_w:
            acc = accumulate_dtype(weight.dtype)
            s = scale.to(acc)
            inner = torch.vdot(grad_w.reshape(-1).to(acc), weight.reshape(-1).to(acc))
            dsigma = weight_gradient(u, v, weight, spec).to(acc)
            grad_w = (grad_w.to(acc) * s - dsigma * (inner * s * s / ctx.lipschitz)).to(
                weight.dtype
            )
        return grad_x, grad_w, grad_b, None, None, None, None, None


def lip_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    lipschitz: float,
    spec: ConvSpec,
) -> torch.Tensor:
    """The op (arguments validated by ``functional.lip_conv2d``)."""
    return _LipConv2d.apply(x, weight, bias, scale, u, v, lipschitz, spec)


def _operator(w: torch.Tensor, spec: ConvSpec, pad, size: tuple[int, int]):
    """(A, A^T) as functions: the convolution on inputs of spatial ``size``, after the circular
    ``pad`` when there is one, and its adjoint."""
    if pad is None:
        return (lambda x: convolve(x, w, spec)), (lambda y: adjoint(y, w, spec, size))
    padded = pad.padded_size(size)
    return (
        lambda x: convolve(pad(x), w, spec),
        lambda y: pad.adjoint(adjoint(y, w, spec, padded)),
    )


@torch.no_grad()
def power_iteration(
    weight: torch.Tensor, v: torch.Tensor, spec: ConvSpec, n_iters: int, pad=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n_iters`` steps of u = A v / |A v|, v = A^T u / |A^T u| on the convolution operator,
    ``pad`` (and its adjoint) applied before A when the padding is circular.

    Returns (sigma, u, v), sigma = |A^T u| = <u, A v> for the returned pair: a LOWER bound on
    |A|_2, never used in a certificate. Computed in the accumulation dtype.
    """
    acc = accumulate_dtype(weight.dtype)
    v = v.detach().to(acc)
    forward, backward = _operator(weight.detach().to(acc), spec, pad, v.shape[2:])
    sigma = torch.zeros((), dtype=acc, device=v.device)
    u = v
    for _ in range(n_iters):
        t = forward(v)
        u = t / torch.linalg.vector_norm(t).clamp_min(_EPS)
        s = backward(u)
        sigma = torch.linalg.vector_norm(s)
        v = s / sigma.clamp_min(_EPS)
    return sigma, u, v


@torch.no_grad()
def lanczos(
    weight: torch.Tensor, v: torch.Tensor, spec: ConvSpec, steps: int, pad=None
) -> torch.Tensor:
    """The top Ritz vector of A^T A after ``steps`` Lanczos steps from ``v`` (fully
    reorthogonalised). A convolution's top singular values cluster, so plain power iteration
    creeps (thousands of steps to converge); Krylov steps reach the same vector in tens."""
    acc = accumulate_dtype(weight.dtype)
    shape = v.shape
    forward, backward = _operator(weight.detach().to(acc), spec, pad, shape[2:])

    def gram(x: torch.Tensor) -> torch.Tensor:
        return backward(forward(x.view(shape))).flatten()

    q = v.detach().to(acc).flatten()
    basis = [q / torch.linalg.vector_norm(q).clamp_min(_EPS)]
    alphas, betas = [], []
    for _ in range(min(steps, q.numel())):
        r = gram(basis[-1])
        alphas.append(torch.dot(r, basis[-1]))
        stacked = torch.stack(basis)
        for _ in range(2):  # twice is enough (Kahan: "twice is enough" reorthogonalisation)
            r = r - stacked.T @ (stacked @ r)
        beta = torch.linalg.vector_norm(r)
        if float(beta) <= _EPS * max(float(alphas[0]), _EPS):
            break
        betas.append(beta)
        basis.append(r / beta)
    n = len(alphas)
    tri = torch.diag(torch.stack(alphas).to(torch.float64))
    if n > 1:
        off = torch.stack(betas[: n - 1]).to(torch.float64)
        tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
    top = torch.linalg.eigh(tri.cpu()).eigenvectors[:, -1].to(device=q.device, dtype=acc)
    return (torch.stack(basis[:n]).T @ top).view(shape)


class CircularPad:
    """Circular padding by (p_h, p_w) as torch's padding_mode="circular" applies it, and its
    adjoint (every padded position's value added back to the input position it copies)."""

    def __init__(self, padding: tuple[int, int]) -> None:
        self.padding = padding

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.padding
        return torch.nn.functional.pad(x, (pw, pw, ph, ph), mode="circular")

    def padded_size(self, size) -> tuple[int, int]:
        return tuple(n + 2 * p for n, p in zip(size, self.padding, strict=True))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        for axis, p in zip((2, 3), self.padding, strict=True):
            n = y.shape[axis] - 2 * p
            index = (torch.arange(y.shape[axis], device=y.device) - p) % n
            shape = list(y.shape)
            shape[axis] = n
            y = y.new_zeros(shape).index_add_(axis, index, y)
        return y
