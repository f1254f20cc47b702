"""Per-example log-likelihoods of the decoder and the Gaussian KL term of the ELBO."""

from __future__ import annotations

import math

import torch

LIKELIHOODS = ("continuous_bernoulli", "bernoulli", "gaussian")


def log_likelihood(
    likelihood: str, decoder_out: torch.Tensor, x: torch.Tensor, observation_std: float = 1.0
) -> torch.Tensor:
    """log p(x | z) summed over features, from the decoder's pre-output (logits or mean).

    Bernoulli-type likelihoods take logits, so no log of a saturated sigmoid is ever formed.
    """
    if likelihood in ("continuous_bernoulli", "bernoulli"):
        bce = torch.nn.functional.binary_cross_entropy_with_logits(decoder_out, x, reduction="none")
        if likelihood == "bernoulli":
            return -bce.sum(-1)
        return (continuous_bernoulli_log_norm(decoder_out) - bce).sum(-1)
    if likelihood == "gaussian":
        var = observation_std**2
        sq = (x - decoder_out).square().sum(-1)
        return -0.5 * sq / var - 0.5 * x.shape[-1] * math.log(2 * math.pi * var)
    raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


def continuous_bernoulli_log_norm(logits: torch.Tensor) -> torch.Tensor:
    """log C(lambda) of the continuous Bernoulli, from logits eta: C = eta / tanh(eta / 2).

    torch.distributions.ContinuousBernoulli clamps lambda to [eps, 1 - eps] first, which is
    wrong for |eta| > ~16; this form is exact for every eta (a Taylor series near eta = 0).
    """
    eta = logits.abs()
    small = eta < 1e-2
    safe = torch.where(small, torch.ones_like(eta), eta)
    exact = torch.log(safe) - torch.log(torch.tanh(safe / 2))
    taylor = math.log(2) + eta.square() / 12 - 7 * eta.pow(4) / 1440
    return torch.where(small, taylor, exact)


def gaussian_kl(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag sigma^2) || N(0, I)) per example."""
    log_sigma = torch.log(sigma.clamp_min(torch.finfo(sigma.dtype).tiny))
    return 0.5 * (mu.square() + sigma.square() - 1 - 2 * log_sigma).sum(-1)
