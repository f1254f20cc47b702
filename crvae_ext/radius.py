"""Certified radii from Lipschitz constants: pure math on float64 tensors (broadcast, batched).

Notation (../shared/docs/certificates.md): a = Lip(decoder), b = Lip(mean), c = Lip(std),
s = |sigma(x)|_2, s_inf = max_i sigma_i(x), m = latent dimension. x is r-robust with
probability p when P(|g(z') - g(z)| <= r) >= p; every radius returned here is a t such that all
perturbations of norm <= t keep that true. Each bound is sound on its own.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from . import _checks

BOUNDS = ("best", "markov", "chi2", "paper")
_BISECTION_STEPS = 80
_TAIL_SLACK = 1e-10  # relative allowance for the rounding of gammaincc: keeps certificates sound
_PAPER_GRID = 200
_F64 = torch.float64


class Radii(NamedTuple):
    """Certified radius per input and the two bounds it is the best of."""

    radius: torch.Tensor
    markov: torch.Tensor
    chi2: torch.Tensor


def _quadratic_root(alpha: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Largest t >= 0 with alpha t^2 + 2 beta t <= gamma (alpha, beta >= 0); 0 if gamma <= 0.

    Written t = gamma / (beta + sqrt(beta^2 + alpha gamma)): no cancellation, alpha = 0 allowed,
    and +inf when alpha = beta = 0 < gamma.
    """
    gamma_pos = gamma.clamp_min(0)
    denom = beta + torch.sqrt(beta * beta + alpha * gamma_pos)
    root = torch.where(denom > 0, gamma_pos / denom.clamp_min(torch.finfo(_F64).tiny), math.inf)
    return torch.where(gamma > 0, root, torch.zeros_like(root))


def markov_radius(a, b, c, s, r, p) -> torch.Tensor:
    """Second-moment bound: a^2 (b^2 t^2 + (s + c t)^2 + s^2) / r^2 <= 1 - p."""
    q = (1 - p) * (r / a) ** 2
    return _quadratic_root(b * b + c * c, s * c, q - 2 * s * s)


def _chi2_tail(u: torch.Tensor, m: int) -> torch.Tensor:
    """P(chi2_m > u), the regularised upper incomplete gamma Q(m/2, u/2)."""
    return torch.special.gammaincc(torch.full_like(u, m / 2), u.clamp_min(0) / 2)


def _chi2_ok(t, a, b, c, s_inf, r, p, m) -> torch.Tensor:
    """True where P(chi2_m > u(t)) <= 1 - p with u(t) = ((r/a - b t) / d(t))^2, b t < r/a."""
    slack = r / a - b * t
    d = torch.sqrt((s_inf + c * t) ** 2 + s_inf**2)
    u = torch.where(d > 0, (slack / d.clamp_min(torch.finfo(_F64).tiny)) ** 2, math.inf)
    return (slack > 0) & (_chi2_tail(u, m) <= (1 - p) * (1 - _TAIL_SLACK))


def chi2_radius(a, b, c, s_inf, r, p, m: int) -> torch.Tensor:
    """Exact chi-square tail bound: the largest t with P(chi2_m > u(t)) <= 1 - p, by bisection.

    u(t) decreases in t, so the certified set is an interval [0, t*]; the bisection only ever
    returns a point where the condition was checked to hold (0 if it fails at t = 0).
    """
    a, b, c, s_inf = torch.broadcast_tensors(a, b, c, s_inf)
    ok0 = _chi2_ok(torch.zeros_like(a), a, b, c, s_inf, r, p, m)
    hi = torch.where(b > 0, r / (a * b.clamp_min(torch.finfo(_F64).tiny)), torch.ones_like(a))
    for _ in range(1100):  # grow the bracket where b = 0 (then only d(t) limits t)
        grow = ok0 & _chi2_ok(hi, a, b, c, s_inf, r, p, m) & torch.isfinite(hi)
        if not bool(grow.any()):
            break
        hi = torch.where(grow, hi * 2, hi)
    lo = torch.zeros_like(a)
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        ok = _chi2_ok(mid, a, b, c, s_inf, r, p, m)
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    unbounded = ok0 & ~torch.isfinite(hi)
    return torch.where(ok0, torch.where(unbounded, math.inf, lo), torch.zeros_like(lo))


def _inglot_tail(u: torch.Tensor, m: int) -> torch.Tensor:
    """Inglot (2010)'s upper bound on P(chi2_m > u), valid for u > m - 2 and m >= 2 (else 1)."""
    valid = u > m - 2
    u_safe = torch.where(valid, u.clamp_max(1e300), torch.full_like(u, float(m)))
    log_term = u_safe - m - (m - 2) * torch.log(u_safe / m) + math.log(m)
    bound = u_safe / (u_safe - m + 2) * torch.exp(-log_term / 2) / math.sqrt(math.pi)
    return torch.where(valid, bound, torch.ones_like(u))


def paper_radius(a, b, c, s, r, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper code's two bounds (p = 1/2), each a certified radius.

    Markov form b^2 t^2 + (c t + 2 s)^2 <= r^2 / (2 a^2); and Inglot's chi-square tail bound
    with d(t) = c t + 2 s, taken on a 200-point grid over [0, r / (a b)].
    """
    a, b, c, s = torch.broadcast_tensors(a, b, c, s)
    markov = _quadratic_root(b * b + c * c, 2 * s * c, r**2 / (2 * a * a) - 4 * s * s)
    if m < 2:
        return markov, torch.zeros_like(markov)
    steps = torch.linspace(0, 1, _PAPER_GRID, dtype=_F64, device=a.device)
    end = torch.where(b > 0, r / (a * b.clamp_min(torch.finfo(_F64).tiny)), torch.zeros_like(b))
    t = end.unsqueeze(-1) * steps  # (..., grid)
    a_, b_, c_, s_ = (v.unsqueeze(-1) for v in (a, b, c, s))
    u = ((r / a_ - b_ * t) / (c_ * t + 2 * s_)) ** 2
    ok = _inglot_tail(torch.nan_to_num(u, nan=0.0), m) <= 0.5
    prefix = torch.cumprod(ok.to(torch.int64), dim=-1).bool()  # certified points form a prefix
    grid = torch.where(prefix, t, torch.zeros_like(t)).amax(dim=-1)
    return markov, grid


def _as_f64(name: str, value, nonneg: bool = True) -> torch.Tensor:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    # Python numbers go straight to float64: a float32 detour would round constants down.
    tensor = (
        value.detach().to(_F64)
        if isinstance(value, torch.Tensor)
        else torch.tensor(float(value), dtype=_F64)
    )
    if torch.isnan(tensor).any():
        raise ValueError(f"{name} contains NaN")
    if nonneg and (tensor < 0).any():
        raise ValueError(f"{name} must be >= 0, got a negative value")
    return tensor


def _check_probability(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"p must be a number, got {type(p).__name__}")
    if not 0 < p < 1:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    return float(p)


def radii(a, b, c, sigma_l2, sigma_inf, r: float, p: float, latent_dim: int, bound: str = "best"):
    """Validated, broadcast radii of every kind (see ``certified_radius``) as a ``Radii``."""
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
    p = _check_probability(p)
    r = _checks.positive_finite("r", r)
    latent_dim = _checks.integer("latent_dim", latent_dim, 1)
    a, b, c = (_as_f64(n, v) for n, v in (("a", a), ("b", b), ("c", c)))
    for name, value in (("a", a), ("b", b), ("c", c)):
        if torch.isinf(value).any():
            raise ValueError(f"{name} must be finite")
    s, s_inf = _as_f64("sigma_l2", sigma_l2), _as_f64("sigma_inf", sigma_inf)
    try:
        a, b, c, s, s_inf = torch.broadcast_tensors(a, b, c, s, s_inf)
    except RuntimeError as exc:
        raise ValueError(
            f"a, b, c, sigma_l2 and sigma_inf must broadcast together: {exc}"
        ) from None
    if (s_inf > s * (1 + 1e-6) + 1e-12).any():
        raise ValueError("sigma_inf (max_i sigma_i) cannot exceed sigma_l2 (|sigma|_2)")
    if bound == "paper":
        if p != 0.5:
            raise ValueError(f"bound='paper' is the paper's p = 1/2 certificate; got p={p}")
        markov, grid = paper_radius(a, b, c, s, r, latent_dim)
        return Radii(torch.maximum(markov, grid), markov, grid)
    constant = a == 0  # a constant decoder never moves: every radius is certified
    a_safe = torch.where(constant, torch.ones_like(a), a)
    markov = torch.where(constant, math.inf, markov_radius(a_safe, b, c, s, r, p))
    chi2 = torch.where(constant, math.inf, chi2_radius(a_safe, b, c, s_inf, r, p, latent_dim))
    chosen = {"best": torch.maximum(markov, chi2), "markov": markov, "chi2": chi2}[bound]
    return Radii(chosen, markov, chi2)


def certified_radius(
    a, b, c, sigma_l2, sigma_inf, r: float, p: float, latent_dim: int, bound: str = "best"
) -> torch.Tensor:
    """Certified radius (float64 tensor, broadcast over the inputs) for Lipschitz constants.

    bound: "markov" (second moment), "chi2" (exact chi-square tail, bisection), "best" (the max
    of both, each sound), "paper" (the paper code's formulas; p = 1/2 only). ``a``, ``b``, ``c``
    must be sound upper bounds computed from the weights, never power-iteration estimates.
    """
    return radii(a, b, c, sigma_l2, sigma_inf, r, p, latent_dim, bound).radius
