"""Sound Lipschitz upper bounds (l2 -> l2) computed from the actual weights, and export.

Only exact quantities enter: float64 SVD spectral norms (inflated by a bound on the SVD's own
rounding error) and the activations' known constants. A power-iteration estimate never does.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from . import _checks, _state, reference

_BOUNDS: dict[type[nn.Module], Callable[[nn.Module], float]] = {}


def svd_margin(*dims: int) -> float:
    """1 + 8 max(m, n) eps64: LAPACK's singular values are exact for a matrix within
    c * max(m, n) * eps64 * |W| of W, so a float64 SVD value times this is an upper bound."""
    return 1.0 + 8 * max(dims, default=1) * torch.finfo(torch.float64).eps


def spectral_norm_bound(weight: torch.Tensor, name: str = "weight") -> float:
    """An upper bound on |weight|_2: the float64 SVD value times (1 + 8 max(m, n) eps64).

    LAPACK's singular values are exact for a matrix within c * max(m, n) * eps64 * |W| of W,
    so the margin covers the SVD's rounding; it is ~1e-12 relative for 1024-wide layers.
    """
    _checks.float_tensor(name, weight)
    _checks.finite_tensor(name, weight)
    return reference.spectral_norm_exact(weight) * svd_margin(*weight.shape)


def scaled_norm_bound(
    weight: torch.Tensor, scale: torch.Tensor, exported: torch.Tensor, name: str = "layer"
) -> float:
    """An upper bound on max(|s W|_2, |E|_2): s W the exact map of a scaled layer (s a 0-d
    tensor), E = ``exported``, s W rounded to the layer's dtype (what an export holds).

    P = s W in float64 is exact when W and s have <= 26 significant bits (fp32 and narrower);
    else |s W - P| <= eps64 |P| entrywise. E - P is exact in float64 (Sterbenz: E is within a
    factor 2 of P), so |E|_2 <= |P|_2 + |E - P|_F and |s W|_2 <= |P|_2 + eps64 |P|_F.
    """
    _checks.finite_tensor(f"{name}'s exported weight", exported)
    eps = torch.finfo(torch.float64).eps
    p = weight.detach().to("cpu", torch.float64) * scale.detach().to("cpu", torch.float64)
    gap = float(torch.linalg.matrix_norm(exported.detach().to("cpu", torch.float64) - p))
    if torch.float64 in (weight.dtype, scale.dtype):
        gap = max(gap, eps * float(torch.linalg.matrix_norm(p)))
    summed = 1 + (p.numel() + 2) * eps  # rounding of the Frobenius norm's sum of squares
    return (spectral_norm_bound(p, f"{name}'s scaled weight") + gap * summed) * (1 + 4 * eps)


def product_norm_bound(left: torch.Tensor, right: torch.Tensor, name: str = "product") -> float:
    """An upper bound on |L R|_2 for float64 matrices L (m x k) and R (k x n) that are the
    exact maps or within u (float64's unit roundoff) of them entrywise: the exact SVD bound of
    fl(L R) plus |L R - fl(L R)|_F <= gamma_k || |L| |R| ||_F (gamma_k = k u / (1 - k u), the
    inner-product error bound) and (2u + u^2) || |L| |R| ||_F for the factors' own rounding, the
    last Frobenius norm inflated for its own rounding."""
    eps = torch.finfo(torch.float64).eps
    k = left.shape[1]
    if 2 * k < min(left.shape[0], right.shape[1]):
        return _low_rank_product_norm_bound(left, right, name)
    gamma = k * eps / 2 / (1 - k * eps / 2)
    magnitude = float(torch.linalg.matrix_norm(left.abs() @ right.abs()))
    summed = 1 + (k + left.shape[0] * right.shape[1] + 2) * eps
    rounding = (gamma + 1.5 * eps) * magnitude * summed
    return (spectral_norm_bound(left @ right, name) + rounding) * (1 + 4 * eps)


def _gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u), u float64's unit roundoff: the inner-product error factor."""
    u = torch.finfo(torch.float64).eps / 2
    return n * u / (1 - n * u)


def _low_rank_product_norm_bound(left: torch.Tensor, right: torch.Tensor, name: str) -> float:
    """|L R|_2 for a thin inner dimension k without the m x n product: with L = Q R_L + E
    (computed QR), |L R|_2 <= |Q|_2 |R_L R|_2 + |E|_F |R|_2, where |Q|_2^2 <= 1 +
    |fl(Q^T Q) - I|_F + gamma_m |Q|_F^2 and |E|_F <= |fl(L - Q R_L)|_F + gamma_(k+1)
    || |L| + |Q| |R_L| ||_F (README, "Joint mean path")."""
    eps = torch.finfo(torch.float64).eps
    m, k = left.shape
    q, r_left = torch.linalg.qr(left)
    up = 1 + (m * k + 4) * eps  # a Frobenius norm's own rounding

    def frob(t: torch.Tensor) -> float:
        return float(torch.linalg.matrix_norm(t)) * up

    gram_gap = frob(q.T @ q - torch.eye(k, dtype=q.dtype, device=q.device))
    q_norm = math.sqrt((1 + gram_gap + _gamma(m) * frob(q) ** 2) * up) * up
    residual = frob(left - q @ r_left) + _gamma(k + 1) * frob(left.abs() + q.abs() @ r_left.abs())
    main = product_norm_bound(r_left, right, name)
    return (q_norm * main + residual * up * spectral_norm_bound(right, name)) * (1 + 4 * eps)


def linear_map(module: nn.Module) -> torch.Tensor | None:
    """The exact matrix (float64, out x in) of a linear layer's eval-mode map, or None when
    ``module`` is not one: nn.Linear's weight, LipLinear's scale times weight (exact in float64
    for fp32 and narrower) or its Björck weight."""
    if type(module) is nn.Linear:
        return module.weight.detach().to("cpu", torch.float64)
    exact = getattr(module, "exact_map", None)
    return exact() if callable(exact) else None


def state_key(module: nn.Module) -> tuple:
    """What a module's bounds depend on, as PyTorch tracks it: every parameter's and buffer's
    ``_state.tensor_key`` (version counter, gradient count for fused optimizer steps, storage,
    shape, dtype, device) and every submodule's plain attributes (slopes, k, the method).
    In-place edits through ``.data`` are invisible: call ``invalidate_cache()``."""
    parts = []
    for m in module.modules():
        attrs = tuple(
            sorted(
                (k, v)
                for k, v in vars(m).items()
                if isinstance(v, (bool, int, float, str)) and k != "training"
            )
        )
        tensors = tuple(
            _state.tensor_key(t)
            for t in (*m._parameters.values(), *m._buffers.values())
            if t is not None
        )
        parts.append((type(m), attrs, tensors))
    return tuple(parts)


def register_bound(*types: type[nn.Module]):
    """Register ``fn(module) -> float`` as the sound bound for modules of ``types``."""

    def decorator(fn: Callable[[nn.Module], float]) -> Callable[[nn.Module], float]:
        for cls in types:
            _BOUNDS[cls] = fn
        return fn

    return decorator


def lipschitz_bound(module: nn.Module) -> float:
    """A sound upper bound on the l2 Lipschitz constant of ``module`` (eval-mode forward).

    Compositions (nn.Sequential) multiply their parts' bounds. Modules of this package, and any
    module with a ``lipschitz_bound()`` method, bound themselves. Registered bounds apply to
    their exact class only (a subclass may override ``forward``). Unknown modules are an error.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if type(module) in _BOUNDS:
        return _BOUNDS[type(module)](module)
    own = getattr(module, "lipschitz_bound", None)
    if callable(own):
        return float(own())
    raise TypeError(
        f"lipschitz_bound: no sound bound is known for {type(module).__name__}; "
        "give it a lipschitz_bound() method or use crvae_ext.register_bound"
    )


@register_bound(nn.Sequential)
def _sequential(module: nn.Sequential) -> float:
    return math.prod(lipschitz_bound(m) for m in module)


@register_bound(nn.Linear)
def _linear(module: nn.Linear) -> float:
    return spectral_norm_bound(module.weight, f"{type(module).__name__}.weight")


@register_bound(nn.ReLU, nn.Tanh, nn.Identity, nn.Flatten, nn.Unflatten)
def _one(module: nn.Module) -> float:
    return 1.0


def _finite_parameter(module: nn.Module, name: str, allow_inf: bool = False) -> float:
    """``module.name`` as a float; NaN (and inf unless allowed) has no Lipschitz bound."""
    value = float(getattr(module, name))
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{type(module).__name__}.{name}={value}: no Lipschitz bound exists")
    return value


# torch's Softplus returns x itself where beta x > threshold: a jump of log1p(e^-t) / |beta| at
# x = t / beta, relative size log1p(e^-t) / t there. Below the fp32 unit roundoff (t >= ~15; the
# default t = 20 gives 1e-10) it is rounding, as in every float op; above it no bound exists.
_SOFTPLUS_MAX_RELATIVE_JUMP = 2.0**-24


@register_bound(nn.Softplus)
def _softplus(module: nn.Softplus) -> float:
    """1: the smooth branch has slope sigmoid(beta x) in (0, 1) for either sign of beta."""
    beta = _finite_parameter(module, "beta")
    threshold = _finite_parameter(module, "threshold", allow_inf=True)
    if beta == 0:
        raise ValueError("Softplus.beta=0 divides by zero: no Lipschitz bound exists")
    if threshold != math.inf:
        # log1p(e^-t) = max(-t, 0) + log1p(e^-|t|): no overflow for any t
        jump = max(-threshold, 0.0) + math.log1p(math.exp(-abs(threshold)))
        if not (threshold > 0 and jump / threshold <= _SOFTPLUS_MAX_RELATIVE_JUMP):
            raise ValueError(
                f"Softplus(threshold={threshold:g}) jumps by {jump / abs(beta):.3g} at "
                f"x = {threshold / beta:g}, where torch switches to the identity: it has no "
                "Lipschitz bound; use threshold >= 15 (the default 20 is fine)"
            )
    return 1.0


@register_bound(nn.Hardtanh)
def _hardtanh(module: nn.Hardtanh) -> float:
    """1: a clamp to [min_val, max_val] (infinite ends allowed, NaN refused)."""
    _finite_parameter(module, "min_val", allow_inf=True)
    _finite_parameter(module, "max_val", allow_inf=True)
    return 1.0


@register_bound(nn.Sigmoid)
def _sigmoid(module: nn.Module) -> float:
    return 0.25


@register_bound(nn.LeakyReLU)
def _leaky_relu(module: nn.LeakyReLU) -> float:
    """max(1, |slope|): slopes 1 and ``negative_slope``, of either sign or size."""
    return max(1.0, abs(_finite_parameter(module, "negative_slope")))


@register_bound(nn.ELU)
def _elu(module: nn.ELU) -> float:
    """max(1, |alpha|): the slope alpha e^x for x < 0 reaches |alpha| at 0-, for either sign."""
    return max(1.0, abs(_finite_parameter(module, "alpha")))


def export(model: nn.Module) -> nn.Module:
    """A deep copy with every Lipschitz layer replaced by its plain equivalent (eval outputs).

    Layers that know their plain form provide ``to_plain()``; the copy needs no crvae_ext ops.
    """
    if hasattr(model, "to_plain"):
        return model.to_plain()
    clone = copy.deepcopy(model)
    _replace_plain(clone)
    return clone


def _replace_plain(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if hasattr(child, "to_plain"):
            setattr(module, name, child.to_plain())
        else:
            _replace_plain(child)
