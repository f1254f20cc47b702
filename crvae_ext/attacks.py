"""Attacks that test the certificates: maximum damage, latent space, and the empirical margin.

All attacks are batched projected gradient methods: every input has its own radius, no Python
loop runs per input, and every iterate stays in the l2 ball of its radius intersected with the
pixel box. The model is put in eval mode with frozen parameters for the duration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from . import _checks
from ._context import eval_mode, frozen
from .certify import robustness_probability

Box = tuple[float, float] | None


@dataclass
class AttackResult:
    """Perturbations (same shape as x) and the objective each one reached."""

    delta: torch.Tensor
    objective: torch.Tensor


@dataclass
class MarginResult:
    """Smallest attack radius per input at which the Monte-Carlo P(|Delta| <= r) fell below p
    (inf: never within ``max_radius``), with the estimate there."""

    margin: torch.Tensor
    probability: torch.Tensor


def _radii(radius: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-input radii as a (batch, 1) tensor, validated."""
    r = torch.as_tensor(radius, dtype=x.dtype, device=x.device).flatten()
    if r.numel() == 1:
        r = r.expand(x.shape[0])
    if r.shape != (x.shape[0],):
        raise ValueError(f"radius must be a number or one value per input, got {tuple(r.shape)}")
    if torch.isnan(r).any() or (r < 0).any():
        raise ValueError("radius must be >= 0 and not NaN")
    return r.unsqueeze(1)


def project(x: torch.Tensor, delta: torch.Tensor, radius: torch.Tensor, box: Box) -> torch.Tensor:
    """A feasible point: clamp x + delta into the box, then shrink into the l2 ball.

    Shrinking towards 0 keeps x + delta in the box (a convex combination of two box points).
    """
    if box is not None:
        delta = (x + delta).clamp(*box) - x
    norm = delta.norm(dim=1, keepdim=True)
    shrink = radius / norm.clamp_min(1e-30) * (1 - 1e-6)  # the margin absorbs rounding
    return torch.where(norm > radius, delta * shrink, delta)


def _flat_input(vae: Any, x: torch.Tensor, box: Box = None, name: str = "x") -> torch.Tensor:
    _checks.finite_tensor(name, _checks.float_tensor(name, x))
    if not callable(getattr(vae, "encode", None)) or not callable(getattr(vae, "decode", None)):
        raise TypeError(f"cannot attack {type(vae).__name__}: it needs encode() and decode()")
    if box is not None:
        low, high = box
        if not low < high:
            raise ValueError(f"box must be (low, high) with low < high, got {box}")
        if bool((x < low).any() or (x > high).any()):
            raise ValueError(f"{name} lies outside the box {box}: rescale it, or pass box=None")
    return x.flatten(1) if x.dim() > 2 else x


def expected_damage(vae: Any, x: torch.Tensor, delta: torch.Tensor, samples: int) -> torch.Tensor:
    """Monte-Carlo E |g(z') - g(z)|, z ~ q(.|x), z' ~ q(.|x + delta) independent, per input."""
    mu, sigma = vae.encode(x)
    mu2, sigma2 = vae.encode(x + delta)
    noise = torch.randn(2, samples, *mu.shape, dtype=mu.dtype, device=mu.device)
    clean = vae.decode((mu + sigma * noise[0]).flatten(0, 1))
    moved = vae.decode((mu2 + sigma2 * noise[1]).flatten(0, 1))
    return (moved - clean).flatten(1).norm(dim=1).view(samples, -1).mean(0)


def _ascend(objective, x, radius, steps, restarts, step_size, box, maximise) -> AttackResult:
    """Normalised-gradient PGD with random restarts, keeping each input's best iterate seen.

    The objective of the returned perturbations is evaluated afresh: with a Monte-Carlo
    objective, the value that made an iterate the best is optimistically biased.
    """
    sign = 1.0 if maximise else -1.0
    best_delta = torch.zeros_like(x)
    best = torch.full((x.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
    alpha = step_size if step_size is not None else 2.5 / steps

    def keep(delta: torch.Tensor, score: torch.Tensor) -> None:
        nonlocal best, best_delta
        better = score > best
        best = torch.where(better, score, best)
        best_delta = torch.where(better.unsqueeze(1), delta, best_delta)

    for _ in range(restarts):
        init = torch.randn_like(x)
        scale = radius * torch.rand_like(radius) / init.norm(dim=1, keepdim=True).clamp_min(1e-12)
        delta = project(x, init * scale, radius, box)
        for _ in range(steps):
            delta.requires_grad_(True)
            value = objective(delta)
            (grad,) = torch.autograd.grad(value.sum(), delta)
            keep(delta.detach(), sign * value.detach())
            step = grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
            delta = project(x, delta.detach() + sign * alpha * radius * step, radius, box)
        with torch.no_grad():
            keep(delta, sign * objective(delta))
    with torch.no_grad():
        final = objective(best_delta)
    return AttackResult(best_delta.detach(), final)


def max_damage(
    vae: Any,
    x: torch.Tensor,
    radius: float | torch.Tensor,
    steps: int = 50,
    restarts: int = 1,
    samples: int = 8,
    box: Box = (0.0, 1.0),
    step_size: float | None = None,
) -> AttackResult:
    """Maximise E |g(z_{x+d}) - g(z_x)| over |d|_2 <= radius with x + d in the box.

    The objective averages ``samples`` draws of the sampling noise per step; ``objective`` in the
    result is the damage each returned perturbation reached.
    """
    flat = _flat_input(vae, x, box)
    steps = _checks.integer("steps", steps, 1)
    restarts = _checks.integer("restarts", restarts, 1)
    samples = _checks.integer("samples", samples, 1)
    radii = _radii(radius, flat)
    with eval_mode(vae), frozen(vae):
        result = _ascend(
            lambda d: expected_damage(vae, flat, d, samples),
            flat,
            radii,
            steps,
            restarts,
            step_size,
            box,
            maximise=True,
        )
    return AttackResult(result.delta.view_as(x), result.objective)


def gaussian_kl_pair(mu, sigma, mu_t, sigma_t) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(mu_t, sigma_t^2)) per input, diagonal Gaussians."""
    ratio = (sigma / sigma_t).square()
    return 0.5 * (ratio + ((mu - mu_t) / sigma_t).square() - 1 - torch.log(ratio)).sum(-1)


def latent_space(
    vae: Any,
    x: torch.Tensor,
    x_target: torch.Tensor,
    radius: float | torch.Tensor,
    steps: int = 100,
    restarts: int = 1,
    box: Box = (0.0, 1.0),
    step_size: float | None = None,
) -> AttackResult:
    """Minimise KL(q(z | x + d) || q(z | x_target)) over |d|_2 <= radius, x + d in the box."""
    flat = _flat_input(vae, x, box)
    target = _flat_input(vae, x_target, name="x_target")
    if target.shape != flat.shape:
        raise ValueError(f"x_target must have x's shape {tuple(x.shape)}")
    steps = _checks.integer("steps", steps, 1)
    radii = _radii(radius, flat)
    with eval_mode(vae), frozen(vae):
        with torch.no_grad():
            mu_t, sigma_t = vae.encode(target)

        def kl(d: torch.Tensor) -> torch.Tensor:
            mu, sigma = vae.encode(flat + d)
            return gaussian_kl_pair(mu, sigma, mu_t, sigma_t)

        result = _ascend(kl, flat, radii, steps, restarts, step_size, box, maximise=False)
    return AttackResult(result.delta.view_as(x), result.objective)


def empirical_margin(
    vae: Any,
    x: torch.Tensor,
    r: float,
    p: float = 0.5,
    max_radius: float | None = None,
    min_radius: float | None = None,
    bisection_steps: int = 10,
    n_samples: int = 256,
    attack_steps: int = 30,
    attack_samples: int = 4,
    box: Box = (0.0, 1.0),
) -> MarginResult:
    """Smallest attack radius at which the Monte-Carlo P(|Delta| <= r) falls below p.

    A batched geometric bisection on [min_radius, max_radius] (default: 1e-3 of the box
    diagonal to the full diagonal); each step runs ``max_damage`` at every input's own radius.
    The returned margin is a radius at which the attack DID push the estimate below p (0 if the
    clean input already fails; inf if even ``max_radius`` does not). A sound certificate is never
    above it, up to Monte-Carlo noise.
    """
    flat = _flat_input(vae, x, box)
    r = _checks.positive_finite("r", r)
    if not 0 < p < 1:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if max_radius is None:
        span = 1.0 if box is None else box[1] - box[0]
        max_radius = span * math.sqrt(flat.shape[1])
    max_radius = _checks.positive_finite("max_radius", max_radius)
    if min_radius is None:
        min_radius = 1e-3 * max_radius
    min_radius = _checks.positive_finite("min_radius", min_radius)
    if min_radius >= max_radius:
        raise ValueError("min_radius must be below max_radius")

    def probability(radius: torch.Tensor) -> torch.Tensor:
        delta = max_damage(vae, flat, radius, attack_steps, 1, attack_samples, box).delta
        return robustness_probability(vae, flat, delta, r, n_samples).estimate.to(flat.device)

    batch = flat.shape[0]
    full = lambda v: torch.full((batch,), v, dtype=torch.float64, device=flat.device)  # noqa: E731
    clean = robustness_probability(vae, flat, torch.zeros_like(flat), r, n_samples).estimate
    at_max = probability(full(max_radius))
    lo, hi, p_hi = full(min_radius), full(max_radius), at_max.to(torch.float64)
    for _ in range(bisection_steps):
        mid = torch.sqrt(lo * hi)
        prob = probability(mid).to(torch.float64)
        broken = prob < p
        hi, p_hi = torch.where(broken, mid, hi), torch.where(broken, prob, p_hi)
        lo = torch.where(broken, lo, mid)
    clean = clean.to(flat.device, torch.float64)
    broke = (at_max < p) | (hi < max_radius)  # hi only ever moves to a radius that broke
    margin = torch.where(broke, hi, math.inf)
    margin = torch.where(clean < p, 0.0, margin)
    return MarginResult(margin, torch.where(clean < p, clean, p_hi))
