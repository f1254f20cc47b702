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

from . import _checks, reference

_BOUNDS: dict[type[nn.Module], Callable[[nn.Module], float]] = {}


def spectral_norm_bound(weight: torch.Tensor, name: str = "weight") -> float:
    """An upper bound on |weight|_2: the float64 SVD value times (1 + 8 max(m, n) eps64).

    LAPACK's singular values are exact for a matrix within c * max(m, n) * eps64 * |W| of W,
    so the margin covers the SVD's rounding; it is ~1e-12 relative for 1024-wide layers.
    """
    _checks.float_tensor(name, weight)
    _checks.finite_tensor(name, weight)
    margin = 1.0 + 8 * max(weight.shape, default=1) * torch.finfo(torch.float64).eps
    return reference.spectral_norm_exact(weight) * margin


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


@register_bound(nn.ReLU, nn.Tanh, nn.Identity, nn.Flatten, nn.Unflatten, nn.Softplus, nn.Hardtanh)
def _one(module: nn.Module) -> float:
    return 1.0


@register_bound(nn.Sigmoid)
def _sigmoid(module: nn.Module) -> float:
    return 0.25


@register_bound(nn.LeakyReLU)
def _leaky_relu(module: nn.LeakyReLU) -> float:
    return max(1.0, abs(module.negative_slope))


@register_bound(nn.ELU)
def _elu(module: nn.ELU) -> float:
    return max(1.0, module.alpha)


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
