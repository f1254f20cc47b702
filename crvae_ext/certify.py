"""Certify API: certificates per input and a priori, design from a target, Monte-Carlo checks.

All Lipschitz constants come from the weights (``lipschitz_constants()``: float64 SVD bounds);
every model is certified in eval mode, the mode whose function the constants describe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from . import _checks, radius
from ._context import eval_mode
from .radius import certified_radius

__all__ = [
    "CertifyResult",
    "LipschitzConstants",
    "ProbabilityEstimate",
    "RobustnessTarget",
    "a_priori_radius",
    "certified_radius",
    "certify",
    "design",
    "robustness_probability",
    "sigma_cap",
]


class LipschitzConstants(NamedTuple):
    """Sound upper bounds (l2 -> l2): a = decoder, b = encoder mean, c = encoder std."""

    a: float
    b: float
    c: float


@dataclass(frozen=True)
class RobustnessTarget:
    """Wanted up front: every input r-robust with probability p within ``radius``."""

    radius: float
    r: float
    p: float = 0.5

    def __post_init__(self) -> None:
        _checks.positive_finite("radius", self.radius)
        _checks.positive_finite("r", self.r)
        radius._check_probability(self.p)


def _model_constants(model: Any) -> LipschitzConstants:
    if not callable(getattr(model, "lipschitz_constants", None)):
        raise TypeError(
            f"cannot bound {type(model).__name__}: certify needs lipschitz_constants() "
            "(a LipschitzVAE, or a model providing sound (a, b, c))"
        )
    return LipschitzConstants(*model.lipschitz_constants())


def sigma_cap(model: Any) -> float:
    """The cap S on |sigma(x)|_2 a model enforces: its std head's l2-ball projection radius."""
    from .modules import L2BallProjection

    std_net = getattr(model, "std_net", None)
    caps = (
        [m.radius for m in std_net.modules() if isinstance(m, L2BallProjection)]
        if isinstance(std_net, torch.nn.Module)
        else []
    )
    if not caps or not isinstance(std_net[-1], L2BallProjection):
        raise TypeError(
            f"a-priori certificates need a std head that ends in an L2BallProjection "
            f"(a LipschitzVAE); {type(model).__name__} caps no |sigma|_2"
        )
    return std_net[-1].radius


def a_priori_radius(
    model_or_constants: Any,
    r: float,
    p: float = 0.5,
    *,
    sigma_max: float | None = None,
    latent_dim: int | None = None,
    bound: str = "best",
) -> float:
    """A radius valid for EVERY input, from (a, b, c) and the sigma cap S (s = s_inf = S).

    Takes a model (its constants from the weights, S from its std head's projection, m from
    its latent size; no overrides) or an (a, b, c) triple with ``sigma_max`` and ``latent_dim``.
    """
    if isinstance(model_or_constants, (tuple, list)):
        if len(model_or_constants) != 3:
            raise ValueError("constants must be an (a, b, c) triple")
        constants = LipschitzConstants(*model_or_constants)
        if sigma_max is None or latent_dim is None:
            raise ValueError("sigma_max and latent_dim are needed with bare constants")
    else:
        if sigma_max is not None or latent_dim is not None:
            raise ValueError(
                "sigma_max and latent_dim are read from the model; pass bare (a, b, c) "
                "constants to choose them"
            )
        cap = sigma_cap(model_or_constants)
        constants = _model_constants(model_or_constants)
        sigma_max, latent_dim = cap, model_or_constants.latent_dim
    cap = _checks.positive_finite("sigma_max", sigma_max)
    return float(certified_radius(*constants, cap, cap, r, p, latent_dim, bound))


def design(
    target: RobustnessTarget,
    latent_dim: int,
    sigma_max: float,
    std_ratio: float = 0.1,
    decoder_ratio: float = 1.0,
    bound: str = "best",
) -> LipschitzConstants:
    """Lipschitz budgets (a, b, c) = (decoder_ratio L, L, std_ratio L), L as large as possible
    while the a-priori certificate still reaches ``target.radius``.

    The radius falls as L grows, so L is found by bisection and only a checked L is returned.
    A small ``std_ratio`` spends little of the budget on the std head (c costs radius).
    """
    if not isinstance(target, RobustnessTarget):
        raise TypeError(f"target must be a RobustnessTarget, got {type(target).__name__}")
    std_ratio = _checks.positive_finite("std_ratio", std_ratio)
    decoder_ratio = _checks.positive_finite("decoder_ratio", decoder_ratio)

    def reaches(scale: float) -> bool:
        budgets = (decoder_ratio * scale, scale, std_ratio * scale)
        got = a_priori_radius(
            budgets, target.r, target.p, sigma_max=sigma_max, latent_dim=latent_dim, bound=bound
        )
        return got >= target.radius

    lo, hi = 1.0, 1.0
    while not reaches(lo):
        lo /= 2
        if lo < 1e-12:
            raise ValueError(f"no Lipschitz budget reaches {target}")
    while reaches(hi):
        hi *= 2
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if reaches(mid) else (lo, mid)
    return LipschitzConstants(decoder_ratio * lo, lo, std_ratio * lo)


@dataclass
class CertifyResult:
    """Per-input certified radii, the constants used and which bound won for each input."""

    radius: torch.Tensor
    markov: torch.Tensor
    chi2: torch.Tensor
    winner: tuple[str, ...]
    constants: LipschitzConstants
    sigma_l2: torch.Tensor
    sigma_inf: torch.Tensor
    r: float
    p: float
    bound: str


def _encoder_of(model: Any) -> Any:
    for attr in ("encode", "decode"):
        if not callable(getattr(model, attr, None)):
            raise TypeError(f"cannot certify {type(model).__name__}: it has no {attr}()")
    return model


def certify(
    vae: Any, x: torch.Tensor, r: float, p: float = 0.5, bound: str = "best"
) -> CertifyResult:
    """Certified radius of every input in ``x`` (batched; constants computed once per call)."""
    model = _encoder_of(vae)
    _checks.finite_tensor("x", _checks.float_tensor("x", x))
    constants = _model_constants(model)
    with eval_mode(model), torch.no_grad():
        _, sigma = model.encode(x)
    sigma = sigma.detach().to(torch.float64)
    s, s_inf = sigma.norm(dim=-1), sigma.amax(dim=-1)
    result = radius.radii(*constants, s, s_inf, r, p, sigma.shape[-1], bound)
    names = ("paper-markov", "paper-inglot") if bound == "paper" else ("markov", "chi2")
    if bound in ("markov", "chi2"):
        winner = (bound,) * len(s)
    else:
        wins = (result.markov >= result.chi2).tolist()
        winner = tuple(names[0] if w else names[1] for w in wins)
    return CertifyResult(
        result.radius,
        result.markov,
        result.chi2,
        winner,
        constants,
        s,
        s_inf,
        float(r),
        float(p),
        bound,
    )


@dataclass
class ProbabilityEstimate:
    """Monte-Carlo P(|g(z') - g(z)| <= r) per input with a Clopper-Pearson interval."""

    estimate: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    successes: torch.Tensor
    n_samples: int
    confidence: float


def clopper_pearson(successes: np.ndarray, n: int, confidence: float) -> tuple[np.ndarray, ...]:
    """Exact two-sided binomial interval (scipy's beta quantiles; scipy is imported here only,
    so that ``import crvae_ext`` stays light)."""
    from scipy import stats

    alpha = 1 - confidence
    k = np.asarray(successes, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        lower = np.where(k > 0, stats.beta.ppf(alpha / 2, k, n - k + 1), 0.0)
        upper = np.where(k < n, stats.beta.ppf(1 - alpha / 2, k + 1, n - k), 1.0)
    return lower, upper


def robustness_probability(
    vae: Any,
    x: torch.Tensor,
    delta: torch.Tensor,
    r: float,
    n_samples: int = 1000,
    confidence: float = 0.95,
    chunk: int = 256,
) -> ProbabilityEstimate:
    """Estimate P(|g(z') - g(z)| <= r), z ~ q(.|x), z' ~ q(.|x + delta) independent."""
    model = _encoder_of(vae)
    r = _checks.positive_finite("r", r)
    n_samples = _checks.integer("n_samples", n_samples, 1)
    chunk = _checks.integer("chunk", chunk, 1)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    _checks.finite_tensor("x", _checks.float_tensor("x", x))
    _checks.finite_tensor("delta", _checks.float_tensor("delta", delta))
    if delta.shape != x.shape:
        raise ValueError(f"delta must be a tensor of x's shape {tuple(x.shape)}")
    successes = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    with eval_mode(model), torch.no_grad():
        mu, sigma = model.encode(x)
        mu2, sigma2 = model.encode(x + delta)
        for start in range(0, n_samples, chunk):
            n = min(chunk, n_samples - start)
            z = mu + sigma * torch.randn(n, *mu.shape, dtype=mu.dtype, device=mu.device)
            z2 = mu2 + sigma2 * torch.randn(n, *mu.shape, dtype=mu.dtype, device=mu.device)
            change = model.decode(z2.flatten(0, 1)) - model.decode(z.flatten(0, 1))
            close = change.flatten(1).norm(dim=1).view(n, -1) <= r
            successes += close.sum(0)
    lower, upper = clopper_pearson(successes.cpu().numpy(), n_samples, confidence)
    successes = successes.cpu()
    return ProbabilityEstimate(
        successes.double() / n_samples,
        torch.as_tensor(lower, dtype=torch.float64),
        torch.as_tensor(upper, dtype=torch.float64),
        successes,
        n_samples,
        confidence,
    )
