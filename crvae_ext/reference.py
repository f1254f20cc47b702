"""Plain-PyTorch oracles for every op; also the "torch" backend.

Written for clarity, not speed: tests compare the Triton and C++ kernels against these, and the
float64 ``spectral_norm_exact`` is the ground truth for every Lipschitz constant.
"""

from __future__ import annotations

import torch

from ._meta import Grads, accumulate_dtype

_EPS = 1e-12


def groupsort(x: torch.Tensor, group_size: int, dim: int) -> torch.Tensor:
    """Sort ascending inside consecutive groups of ``group_size`` along ``dim`` (stable)."""
    dim = dim % x.dim()
    grouped = x.unflatten(dim, (-1, group_size))
    return grouped.sort(dim=dim + 1, stable=True).values.flatten(dim, dim + 1).contiguous()


def groupsort_backward(
    grad: torch.Tensor, x: torch.Tensor, group_size: int, dim: int
) -> torch.Tensor:
    """Route each output gradient back to the input element that was sorted into its place."""
    dim = dim % x.dim()
    order = x.unflatten(dim, (-1, group_size)).sort(dim=dim + 1, stable=True).indices
    grouped_grad = grad.unflatten(dim, (-1, group_size))
    grad_x = torch.zeros_like(grouped_grad).scatter_(dim + 1, order, grouped_grad)
    return grad_x.flatten(dim, dim + 1).contiguous()


def power_iteration(
    weight: torch.Tensor, v: torch.Tensor, n_iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``n_iters`` steps of u = W v / |W v|, v = W^T u / |W^T u| from the right vector ``v``.

    Returns (sigma, u, v) with sigma = |W^T u| = u^T W v for the returned pair: a lower bound on
    the spectral norm, never to be used in a certificate.
    """
    acc = accumulate_dtype(weight.dtype)
    w = weight.detach().to(acc)
    v = v.detach().to(acc, copy=True)
    u = torch.zeros(w.shape[0], dtype=acc, device=w.device)
    sigma = torch.zeros((), dtype=acc, device=w.device)
    for _ in range(n_iters):
        t = torch.mv(w, v)
        u = t / t.norm().clamp_min(_EPS)
        s = torch.mv(w.t(), u)
        sigma = s.norm()
        v = s / sigma.clamp_min(_EPS)
    return sigma, u, v


def lip_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor
) -> torch.Tensor:
    """y = scale * (x W^T) + b for a 2-D ``x``, without forming the scaled weight.

    The scale (fp32, or fp64) is applied in its own precision, never rounded to fp16/bf16:
    the Lipschitz bound is computed with exactly that factor.
    """
    acc = accumulate_dtype(x.dtype)
    out = torch.mm(x, weight.t()).to(acc).mul_(scale.to(acc))
    if bias is not None:
        out = out.add_(bias.to(acc))
    return out.to(x.dtype)


def lip_linear_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None,
    scale: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    lipschitz: float,
    needs: tuple[bool, bool, bool] | list[bool],
) -> Grads:
    """Gradients of y = k x W^T / (u^T W v) + b w.r.t. (x, W, b), u and v held constant.

    dW = s G^T x - (s / k) <G, y - b> u v^T with s = k / sigma, the rank-1 term added in place.
    <G, y - b> = <grad_x, x> when grad_x is computed (then ``out`` may be None), else
    <G, y> - <1^T G, b> from the saved output.
    """
    need_x, need_w, need_b = needs
    from_y = need_w and not need_x  # <G, y - b> from the saved output
    if from_y and out is None:
        raise ValueError("lip_linear_backward: out is required when x needs no gradient")
    grad_bias = grad.sum(0) if bias is not None and (need_b or from_y) else None
    acc = accumulate_dtype(grad.dtype)
    g = (grad.to(acc) * scale.to(acc)).to(grad.dtype)
    grad_x = torch.mm(g, weight) if need_x else None
    grad_w = None
    if need_w:
        if from_y:
            inner = torch.vdot(grad.reshape(-1).to(acc), out.reshape(-1).to(acc))
            if bias is not None:
                inner = inner - torch.dot(grad_bias.to(acc), bias.to(acc))
        else:
            inner = torch.vdot(grad_x.reshape(-1).to(acc), x.reshape(-1).to(acc))
        coef = inner * (scale.to(acc) / lipschitz)
        grad_w = torch.mm(g.t(), x)
        grad_w.addr_(u.to(weight.dtype), (v * -coef).to(weight.dtype))
    return grad_x, grad_w, grad_bias if need_b else None


def spectral_norm_exact(weight: torch.Tensor) -> float:
    """Largest singular value of ``weight`` from a float64 SVD: the ground truth."""
    return float(torch.linalg.matrix_norm(weight.detach().to("cpu", torch.float64), ord=2))
