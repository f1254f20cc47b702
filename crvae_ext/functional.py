"""Functional API: validate arguments, pick the backend, call the op.

Data flows module -> functional -> op -> backend kernel; nothing here computes on tensors
beyond reshapes, so every backend sees the same validated, 2-D problem.
"""

from __future__ import annotations

import torch

from . import _backend, _checks, _lip_conv, _torch_private, ops


def groupsort(
    x: torch.Tensor, group_size: int = 2, dim: int = 1, backend: str | None = None
) -> torch.Tensor:
    """Sort ascending inside consecutive groups of ``group_size`` elements along ``dim``.

    ``group_size`` is the size of each group (deel-torchlip's convention), not the number of
    groups (LNets'); ``group_size == x.shape[dim]`` is a full sort, 2 is MaxMin.
    """
    if type(x) is torch.Tensor and not torch.compiler.is_compiling():
        # The backend's one-call groupsort where it has one (cpp: in C++): it checks its
        # arguments, normalises dim, records a node only where a gradient is wanted, and
        # returns None where this Python path must run (ops.eager_entry).
        raw = _torch_private.environ_raw
        env, interpret = raw(_backend.ENV_KEY), raw(_backend.INTERPRET_KEY)
        checked = ops.resolved_entry("groupsort_autograd", backend, x.device, env, interpret)
        if checked is not None:
            try:
                y = checked(x, group_size, dim)
            except (TypeError, ValueError):
                y = None  # the checks below name what is wrong
            if y is not None:
                return y
    _checks.float_tensor("x", x)
    group_size = _checks.integer("group_size", group_size, 1)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension, got a 0-d tensor")
    d = _checks.dim_index("dim", dim, x.dim())
    if x.shape[d] % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide size {x.shape[d]} of dim {dim} "
            f"(input shape {tuple(x.shape)})"
        )
    if group_size == 1:
        return x
    return ops.groupsort_autograd(x, group_size, d, _backend.resolve(backend, x.device))


def power_iteration(
    weight: torch.Tensor, v: torch.Tensor, n_iters: int = 1, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n_iters`` steps of u = W v/|W v|, v = W^T u/|W^T u| from the right vector ``v``.

    Returns (sigma, u, v) with sigma = u^T W v (fp32 for half weights). One read of W per step
    in the fused backends. Not differentiable. sigma is a LOWER bound on the spectral norm.
    """
    _checks.float_tensor("weight", weight)
    _checks.float_tensor("v", v)
    n_iters = _checks.integer("n_iters", n_iters, 1)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    if v.shape != (weight.shape[1],):
        raise ValueError(f"v must have shape ({weight.shape[1]},), got {tuple(v.shape)}")
    if v.device != weight.device:
        raise ValueError(f"v is on {v.device} but weight is on {weight.device}")
    name = _backend.resolve(backend, weight.device)
    return ops.call("power_iteration", name, weight.detach(), v.detach(), n_iters)


def lip_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    lipschitz: float,
    backend: str | None = None,
) -> torch.Tensor:
    """y = scale * (x W^T) + b over the last dimension of ``x``.

    ``scale`` must equal ``lipschitz / (u^T W v)``: the backward then adds the rank-1 term of
    d sigma / dW = u v^T, so gradients are those of k * x W^T / sigma(W) + b.
    """
    check_linear_input(x, weight)
    lipschitz = _checks.positive_finite("lipschitz", lipschitz)
    out_features, in_features = weight.shape
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    _check_scaled(x, weight, bias, scale, u, v)
    if u.shape != (out_features,) or v.shape != (in_features,):
        raise ValueError(
            f"u, v must have shapes ({out_features},), ({in_features},); "
            f"got {tuple(u.shape)}, {tuple(v.shape)}"
        )
    name = _backend.resolve(backend, x.device)
    u, v = u.detach(), v.detach()
    if x.dim() == 2:  # no reshapes (each is a view node of the graph)
        return ops.lip_linear_autograd(x, weight, bias, scale, u, v, lipschitz, name)
    flat = x.reshape(-1, in_features)
    out = ops.lip_linear_autograd(flat, weight, bias, scale, u, v, lipschitz, name)
    return out.reshape(*x.shape[:-1], out_features)


def lip_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    lipschitz: float,
    spec: _lip_conv.ConvSpec,
) -> torch.Tensor:
    """y = A_(scale K) x + b: conv2d, or conv_transpose2d if ``spec.transposed``, of the
    kernel scaled by ``scale``, which must equal ``lipschitz / <u, A_K v>``: the backward then
    adds the rank-1 analogue d sigma / dK = the weight gradient of (v, u)."""
    _checks.float_tensor("x", x)
    _checks.float_tensor("weight", weight)
    lipschitz = _checks.positive_finite("lipschitz", lipschitz)
    if x.dim() not in (3, 4) or weight.dim() != 4:
        raise ValueError(
            f"x must be 3-D or 4-D and weight 4-D, got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    if x.dtype != weight.dtype:
        raise TypeError(f"x has dtype {x.dtype} but weight has dtype {weight.dtype}")
    _check_scaled(x, weight, bias, scale, u, v)
    batched = x if x.dim() == 4 else x.unsqueeze(0)
    out = _lip_conv.lip_conv2d(
        batched, weight, bias, scale, u.detach(), v.detach(), lipschitz, spec
    )
    return out if x.dim() == 4 else out.squeeze(0)


def _check_scaled(x, weight, bias, scale, u, v) -> None:
    """The scaled layers' shared arguments: float (u, v, scale), a constant 0-d scale, and every
    tensor on x's device."""
    for name, t in (("scale", scale), ("u", u), ("v", v)):
        _checks.float_tensor(name, t)
    if scale.dim() != 0 or scale.requires_grad:
        raise ValueError("scale must be a 0-d tensor that does not require grad")
    for name, t in (("weight", weight), ("bias", bias), ("scale", scale), ("u", u), ("v", v)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def check_linear_input(x: torch.Tensor, weight: torch.Tensor) -> None:
    """Raise a clear error unless ``x`` fits a linear layer with ``weight`` (out x in)."""
    _checks.float_tensor("x", x)
    _checks.float_tensor("weight", weight)
    in_features = weight.shape[1]
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"x must have last dimension in_features={in_features}, got shape {tuple(x.shape)}"
        )
    if x.dtype != weight.dtype:
        raise TypeError(f"x has dtype {x.dtype} but weight has dtype {weight.dtype}")


def bjorck(weight: torch.Tensor, iters: int = 20, beta: float = 0.5) -> torch.Tensor:
    """Order-1 Björck orthonormalisation W <- (1 + beta) W - beta W W^T W, differentiable.

    Converges to the orthogonal polar factor when |W|_2 < sqrt(3); multiplies through the
    smaller Gram matrix.
    """
    iters = _checks.integer("iters", iters, 0)
    w = weight
    wide = w.shape[0] < w.shape[1]
    for _ in range(iters):
        cubic = torch.mm(torch.mm(w, w.t()), w) if wide else torch.mm(w, torch.mm(w.t(), w))
        w = (1 + beta) * w - beta * cubic
    return w
