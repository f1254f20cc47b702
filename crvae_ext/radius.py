"""Certified radii from Lipschitz constants: pure math on float64 tensors (broadcast, batched).

Notation (README, "Certified VAEs"): a = Lip(decoder), b = Lip(mean), c = Lip(std),
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
_BISECTION_STEPS = 100  # on a log scale over [1e-300, 1e300]: ~1e-27 relative resolution
_SECANT_STEPS = 30  # Illinois regula falsi: superlinear, converged long before on any bracket
_TAIL_SLACK = 1e-10  # relative allowance for the rounding of gammaincc: keeps certificates sound
_ROOT_SLACK = 1e-12  # relative allowance for the rounding of the quadratic root
_T_MIN, _T_MAX = 1e-300, 1e300
_PAPER_GRID = 200
_F64 = torch.float64


class Radii(NamedTuple):
    """Certified radius per input and the two bounds it is the best of."""

    radius: torch.Tensor
    markov: torch.Tensor
    chi2: torch.Tensor


def _quadratic_root(b, c, s_eff, gamma) -> torch.Tensor:
    """Largest t >= 0 with (b^2 + c^2) t^2 + 2 s_eff c t <= gamma (b, c, s_eff >= 0).

    Solved for tau = k t with k = max(b, c), so no square of a tiny constant underflows, as
    tau = gamma / (s' + sqrt(s'^2 + alpha' gamma)) (no cancellation). 0 where gamma <= 0, +inf
    where b = c = 0 < gamma; shrunk by a relative 1e-12 (its rounding) and capped at 1e300, so
    the returned t always satisfies the inequality.
    """
    k = torch.maximum(b, c)
    k_safe = torch.where(k > 0, k, torch.ones_like(k))
    b_hat, c_hat = b / k_safe, c / k_safe
    lin = s_eff * c_hat
    gamma_pos = gamma.clamp_min(0)
    tau = gamma_pos / (lin + torch.sqrt(lin * lin + (b_hat * b_hat + c_hat * c_hat) * gamma_pos))
    root = (tau / k_safe * (1 - _ROOT_SLACK)).nan_to_num(posinf=_T_MAX).clamp_max(_T_MAX)
    root = torch.where(k > 0, root, math.inf)
    return torch.where(gamma > 0, root, torch.zeros_like(root))


def markov_radius(a, b, c, s, r, p, projection=None) -> torch.Tensor:
    """Second-moment bound: a^2 (b^2 t^2 + (s + c t)^2 + s^2) / r^2 <= 1 - p.

    With ``projection`` (see ``effective_c``) c depends on t: the largest t that passes, by
    bisection (the condition is monotone in t); else the closed-form root.
    """
    q = ((1 - p) * (r / a) ** 2).clamp_max(_T_MAX)  # overflow would round UP: clamp instead
    if projection is None:
        return _quadratic_root(b, c, s, q - 2 * s * s)

    a, b, c, s = torch.broadcast_tensors(a, b, c, s)
    budget = q * (1 - _TAIL_SLACK)

    def gap(t):  # decreasing in t; the condition is gap >= 0
        ct = effective_c(t, c, projection)
        return budget - (b * b * t * t + (s + ct * t) ** 2 + s * s)

    k = torch.maximum(b, c)  # b^2 t^2 + (s + c t)^2 >= k^2 t^2: the gap is < 0 beyond hi
    hi = torch.where(k > 0, 2 * torch.sqrt(q) / k, math.inf)
    return _largest_root(gap, hi, unbounded=(gap(torch.zeros_like(a)) >= 0) & (k == 0))


def effective_c(t, c, projection) -> torch.Tensor:
    """Lipschitz constant of the std head over the ball of radius t around x, projection-aware.

    ``projection`` = (S, v_norm): the head is P_S o v, P_S the projection onto the l2 ball of
    radius S, c >= Lip(v) and v_norm = |v(x)|. Over the ball |v| >= rho = v_norm - c t; where
    rho > S, P_S is w -> S w / |w| there, which is (S / rho)-Lipschitz on {|w| >= rho}
    (Dunkl-Williams in a Hilbert space: |x/|x| - y/|y|| <= 2 |x - y| / (|x| + |y|)), so the head
    is (c S / rho)-Lipschitz; elsewhere P_S is 1-Lipschitz (a projection onto a convex set).
    """
    if projection is None:
        return c
    cap, v_norm = projection
    rho = v_norm - c * t
    return torch.where(rho > cap, c * cap / rho.clamp_min(torch.finfo(_F64).tiny), c)


def _chi2_tail(u: torch.Tensor, m: int) -> torch.Tensor:
    """P(chi2_m > u), the regularised upper incomplete gamma Q(m/2, u/2)."""
    return torch.special.gammaincc(torch.full_like(u, m / 2), u.clamp_min(0) / 2)


def _chi2_ok(t, a, b, c, s_inf, r, p, m) -> torch.Tensor:
    """True where P(chi2_m > u(t)) <= 1 - p with u(t) = ((r/a - b t) / d(t))^2, b t < r/a."""
    slack = r / a - b * t
    d = torch.sqrt((s_inf + c * t) ** 2 + s_inf**2)
    u = torch.where(d > 0, (slack / d.clamp_min(torch.finfo(_F64).tiny)) ** 2, math.inf)
    return (slack > 0) & (_chi2_tail(u, m) <= (1 - p) * (1 - _TAIL_SLACK))


def _largest(ok, end: torch.Tensor, unbounded: torch.Tensor) -> torch.Tensor:
    """The largest t in [1e-300, end] where the monotone condition ``ok`` holds (its checked
    points only), by bisection on a log scale; 0 where it fails at 0; inf where ``unbounded``."""
    zero = torch.zeros_like(end)
    ok0 = ok(zero)
    lo = torch.full_like(end, _T_MIN)
    found = ok(lo)
    log_lo, log_hi = torch.log(lo), torch.log(end.clamp(_T_MIN, _T_MAX))
    for _ in range(_BISECTION_STEPS):
        mid = torch.exp((log_lo + log_hi) / 2)
        passed = ok(mid)
        lo = torch.where(passed, mid, lo)
        log_lo = torch.where(passed, torch.log(mid), log_lo)
        log_hi = torch.where(passed, log_hi, torch.log(mid))
    radius = torch.where(found & ok0, lo, zero)
    return torch.where(unbounded, math.inf, radius)


def passes(t, a, b, c, s, s_inf, r, p, m: int, bound: str = "best") -> torch.Tensor:
    """True where perturbations of norm t are certified by ``bound`` ("markov", "chi2" or
    "best": either), checked exactly (the second moment, or the chi-square tail by gammaincc),
    with the rounding allowances."""
    q = ((1 - p) * (r / a) ** 2).clamp_max(_T_MAX)
    second = b * b * t * t + (s + c * t) ** 2 + s * s
    markov = second <= q * (1 - _TAIL_SLACK)
    if bound == "markov":
        return markov
    chi2 = _chi2_ok(t, a, b, c, s_inf, r, p, m)
    return chi2 if bound == "chi2" else markov | chi2


def chi2_quantile_upper(m: int, tail: float) -> float:
    """A q with P(chi2_m > q) <= tail, checked with the exact tail (gammaincc)."""
    q = _chi2_quantile(m, tail) or float(m)
    while float(_chi2_tail(torch.tensor(q, dtype=_F64), m)) > tail:
        q *= 1 + 1e-9 if q > m else 2
    return q


def _chi2_quantile(m: int, tail: float) -> float | None:
    """u* with P(chi2_m > u*) = tail (scipy; None without it): a starting point only, every
    radius is checked with the exact tail afterwards."""
    try:
        from scipy import special
    except ImportError:
        return None
    value = 2 * float(special.gammainccinv(m / 2, tail))
    return value if math.isfinite(value) and value > 0 else None


def _largest_root(gap, hi: torch.Tensor, unbounded: torch.Tensor, ok=None) -> torch.Tensor:
    """The largest t with gap(t) >= 0 for a continuous gap decreasing in t, gap(hi) < 0: a
    regula falsi (Illinois) on [0, hi] from both ends, then a check of the result (by ``ok``
    where given, else by gap itself), stepping down by a relative 1e-12, 1e-9, 1e-6 where the
    check fails; entries still failing, not converged within the steps or without a sign
    change go to the log-scale bisection. Only checked points are returned."""
    zero = torch.zeros_like(hi)
    check = ok if ok is not None else (lambda t: gap(t) >= 0)
    hi = hi.clamp_max(_T_MAX)
    lo, g_lo, g_hi = zero, gap(zero), gap(hi)
    started = (g_lo >= 0) & check(zero)
    no_sign_change = ~((g_hi < 0) & torch.isfinite(g_hi))  # (or a bracket too wide to search)
    idle = ~started | no_sign_change
    side = torch.zeros_like(hi)
    converged = idle
    for step in range(_SECANT_STEPS):
        t = lo + (hi - lo) * (g_lo / (g_lo - g_hi))
        inside = (t > lo) & (t < hi)
        # a secant point that rounds onto the bracket's end: converged to rounding there
        converged = converged | (~inside & torch.isfinite(t)) | ((hi - lo) <= 1e-14 * hi)
        if step % 2 == 1 and bool(converged.all()):
            break
        t = torch.where(inside, t, (lo + hi) / 2)
        g_t = gap(t)
        up = g_t >= 0
        g_hi = torch.where(up & (side > 0), g_hi / 2, g_hi)
        g_lo = torch.where(~up & (side < 0), g_lo / 2, g_lo)
        lo, g_lo = torch.where(up, t, lo), torch.where(up, g_t, g_lo)
        hi, g_hi = torch.where(up, hi, t), torch.where(up, g_hi, g_t)
        side = torch.where(up, 1.0, -1.0)
    result = torch.where(check(lo), lo, zero)
    for shrink in (1e-12, 1e-9, 1e-6):
        retry = started & (result == 0) & (lo > 0)
        if not bool(retry.any()):
            break
        candidate = lo * (1 - shrink)
        result = torch.where(retry & check(candidate), candidate, result)
    hard = started & (((result == 0) & (lo > 0)) | no_sign_change | ~converged)
    if bool(hard.any()):
        result = torch.where(hard, _largest(check, hi, unbounded & hard), result)
    result = torch.where(started, result, zero)
    return torch.where(unbounded, math.inf, result)


def chi2_radius(a, b, c, s_inf, r, p, m: int, projection=None) -> torch.Tensor:
    """Exact chi-square tail bound: the largest t with P(chi2_m > u(t)) <= 1 - p, by bisection.

    u(t) decreases in t (also with a t-dependent projection-aware c), so the certified set is an
    interval [0, t*]. The bisection runs on a log scale over [1e-300, min(r / (a b), 1e300)]
    (any magnitude of the constants), and only ever returns a point where the condition was
    checked to hold; 0 if none was.
    """
    a, b, c, s_inf = torch.broadcast_tensors(a, b, c, s_inf)

    def ok(t):
        return _chi2_ok(t, a, b, effective_c(t, c, projection), s_inf, r, p, m)

    with torch.no_grad():
        end = torch.where(b > 0, r / (a * b), math.inf).nan_to_num(posinf=_T_MAX)
    unbounded = ok(torch.zeros_like(a)) & (b == 0) & (c == 0)
    quantile = _chi2_quantile(m, (1 - p) * (1 - _TAIL_SLACK))
    if quantile is None or not bool((b > 0).all()):
        return _largest(ok, end, unbounded)
    root_q = math.sqrt(quantile)

    def gap(t):  # r/a - b t - sqrt(u*) d(t): decreasing, >= 0 exactly where the tail passes
        d = torch.sqrt((s_inf + effective_c(t, c, projection) * t) ** 2 + s_inf**2)
        return r / a - b * t - root_q * d

    return _largest_root(gap, end, unbounded, ok)


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
    gamma = (r**2 / (2 * a * a)).clamp_max(_T_MAX) - 4 * s * s
    markov = _quadratic_root(b, c, 2 * s, gamma)
    if m < 2:
        return markov, torch.zeros_like(markov)
    steps = torch.linspace(0, 1, _PAPER_GRID, dtype=_F64, device=a.device)
    end = torch.where(b > 0, r / (a * b), torch.zeros_like(b)).nan_to_num(posinf=_T_MAX)
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


def radii(
    a,
    b,
    c,
    sigma_l2,
    sigma_inf,
    r: float,
    p: float,
    latent_dim: int,
    bound: str = "best",
    projection=None,
):
    """Validated, broadcast radii of every kind (see ``certified_radius``) as a ``Radii``.

    ``projection`` = (S, |v(x)|) makes c projection-aware (``effective_c``; not for "paper").
    """
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
    if (s_inf < s / math.sqrt(latent_dim) * (1 - 1e-6)).any():
        raise ValueError(
            f"sigma_inf must be >= sigma_l2 / sqrt(latent_dim={latent_dim}): the largest of "
            "m entries is at least their l2 norm over sqrt(m)"
        )
    constant = a == 0  # a constant decoder never moves: every radius is certified
    a_safe = torch.where(constant, torch.ones_like(a), a)
    inf = lambda t: torch.where(constant, math.inf, t)  # noqa: E731
    if bound == "paper":
        if p != 0.5:
            raise ValueError(f"bound='paper' is the paper's p = 1/2 certificate; got p={p}")
        markov, grid = (inf(t) for t in paper_radius(a_safe, b, c, s, r, latent_dim))
        return Radii(torch.maximum(markov, grid), markov, grid)
    if projection is not None:
        cap = _checks.positive_finite("projection radius S", float(projection[0]))
        v_norm = _as_f64("projection's |v(x)|", projection[1])
        projection = tuple(torch.broadcast_tensors(torch.full_like(v_norm, cap), v_norm))
    markov = inf(markov_radius(a_safe, b, c, s, r, p, projection))
    chi2 = inf(chi2_radius(a_safe, b, c, s_inf, r, p, latent_dim, projection))
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
