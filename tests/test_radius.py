"""Certified-radius math: the paper's worked numbers, soundness by Monte Carlo, monotonicity."""

import math

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from scipy import optimize
from scipy.stats import chi2

from crvae_ext import certified_radius
from crvae_ext.radius import radii

# certificates.md, "Worked numbers": a = b = c = L, r = 8, m = 10, p = 1/2, S = 0.1 a priori.
WORKED = {5: (0.1387, 0.1491), 6: (0.0932, 0.1018), 8: (0.0487, 0.0553), 10: (0.0287, 0.0341)}


@pytest.mark.parametrize("lip", WORKED)
def test_worked_numbers(lip):
    paper, ours = WORKED[lip]
    assert round(float(certified_radius(lip, lip, lip, 0.1, 0.1, 8, 0.5, 10, "paper")), 4) == paper
    assert round(float(certified_radius(lip, lip, lip, 0.1, 0.1, 8, 0.5, 10, "markov")), 4) == ours


def test_chi2_matches_closed_form_with_scipy_quantile():
    a, b, c, s_inf, r, p, m = 2.0, 3.0, 0.7, 0.05, 4.0, 0.8, 6
    q = chi2.ppf(p, m)

    def gap(t):
        return (r / a - b * t) - math.sqrt(q) * math.sqrt((s_inf + c * t) ** 2 + s_inf**2)

    expected = optimize.brentq(gap, 0, r / (a * b), xtol=1e-15)
    got = float(certified_radius(a, b, c, s_inf * 2, s_inf, r, p, m, "chi2"))
    assert got == pytest.approx(expected, rel=1e-9)
    assert got <= expected  # never above the exact root


def test_markov_matches_quadratic_formula():
    a, b, c, s, r, p = 1.5, 2.0, 0.4, 0.3, 3.0, 0.7
    alpha, beta, gamma = b * b + c * c, s * c, (1 - p) * r * r / (a * a) - 2 * s * s
    expected = (-beta + math.sqrt(beta * beta + alpha * gamma)) / alpha
    assert float(certified_radius(a, b, c, s, s, r, p, 4, "markov")) == pytest.approx(expected)


def _mc_success(a, b, c, sigma, t, r, n, seed):
    """P(a |z' - z| <= r) under the adversary the constants allow at |d| = t: mean shift b t,
    the largest sigma grown by c t, a decoder that scales distances by a."""
    gen = torch.Generator().manual_seed(seed)
    sigma2 = sigma.clone()
    sigma2[sigma.argmax()] += c * t
    shift = torch.zeros_like(sigma)
    shift[0] = b * t
    eps = torch.randn(n, len(sigma), generator=gen, dtype=torch.float64)
    diff = shift + torch.sqrt(sigma2**2 + sigma**2) * eps
    return (a * diff.norm(dim=1) <= r).double().mean().item()


@settings(max_examples=40, deadline=None)
@given(
    a=st.floats(0.5, 5),
    b=st.floats(0.0, 5),
    c=st.floats(0.0, 5),
    sigma_scale=st.floats(0.01, 1.0),
    m=st.integers(1, 12),
    r=st.floats(0.5, 10),
    p=st.floats(0.05, 0.99),
    seed=st.integers(0, 2**16),
)
@example(a=1.0, b=0.0, c=7.26224338522269e-257, sigma_scale=0.25, m=1, r=1.0, p=0.5, seed=0)
def test_sound_under_adversarial_configurations(a, b, c, sigma_scale, m, r, p, seed):
    gen = torch.Generator().manual_seed(seed)
    sigma = sigma_scale * torch.rand(m, generator=gen, dtype=torch.float64).clamp_min(0.05)
    radius = float(certified_radius(a, b, c, sigma.norm(), sigma.max(), r, p, m))
    assume(0 < radius < math.inf)
    n = 40_000
    success = _mc_success(a, b, c, sigma, radius, r, n, seed)
    assert success >= p - 5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize(
    ("config", "inflate"),
    [((1.0, 2.0, 0.5, 0.2, 1.0, 0.99, 1), 1.5), ((3.0, 3.0, 3.0, 0.1, 8.0, 0.5, 10), 2.2)],
    ids=["chi2-tight", "markov-tight"],
)
def test_inflated_radius_is_caught(config, inflate):
    """The Monte-Carlo check has power: a radius this much too large fails it."""
    a, b, c, sigma_norm, r, p, m = config
    sigma = torch.full((m,), sigma_norm / math.sqrt(m), dtype=torch.float64)
    radius = float(certified_radius(a, b, c, sigma.norm(), sigma.max(), r, p, m))
    n = 200_000
    margin = 5 * math.sqrt(p * (1 - p) / n)
    assert _mc_success(a, b, c, sigma, radius, r, n, 1) >= p - margin
    assert _mc_success(a, b, c, sigma, inflate * radius, r, n, 2) < p - margin


@settings(max_examples=30, deadline=None)
@given(
    base=st.tuples(st.floats(0.5, 4), st.floats(0.5, 4), st.floats(0.1, 4), st.floats(0.02, 0.5)),
    factor=st.floats(1.05, 3),
    which=st.sampled_from(["a", "b", "c", "s"]),
    bound=st.sampled_from(["markov", "chi2", "best"]),
)
def test_radius_falls_as_constants_or_sigma_grow(base, factor, which, bound):
    a, b, c, s = base
    kwargs = {"a": a, "b": b, "c": c, "s": s}
    before = float(certified_radius(a, b, c, s, s, 8.0, 0.5, 10, bound))
    kwargs[which] *= factor
    k = kwargs
    after = float(certified_radius(k["a"], k["b"], k["c"], k["s"], k["s"], 8.0, 0.5, 10, bound))
    assert after <= before
    if before > 0:
        assert after < before


@settings(max_examples=30, deadline=None)
@given(
    constants=st.tuples(st.floats(0.5, 4), st.floats(0.5, 4), st.floats(0.1, 4)),
    s=st.floats(0.02, 0.3),
    bound=st.sampled_from(["markov", "chi2", "best"]),
)
def test_radius_rises_with_r_and_as_p_falls(constants, s, bound):
    a, b, c = constants
    base = float(certified_radius(a, b, c, s, s, 4.0, 0.6, 8, bound))
    assert float(certified_radius(a, b, c, s, s, 6.0, 0.6, 8, bound)) >= base
    assert float(certified_radius(a, b, c, s, s, 4.0, 0.4, 8, bound)) >= base


def test_broadcast_and_best_is_max():
    s = torch.tensor([0.01, 0.05, 0.1, 0.3])
    out = radii(2.0, torch.tensor([1.0, 2.0, 3.0, 4.0]), 0.5, s, s, 8.0, 0.9, 10)
    assert out.radius.shape == (4,)
    assert torch.equal(out.radius, torch.maximum(out.markov, out.chi2))
    assert out.radius.dtype == torch.float64


def test_degenerate_constants():
    assert float(certified_radius(0.0, 1.0, 1.0, 0.1, 0.1, 1.0, 0.5, 2)) == math.inf
    assert float(certified_radius(1.0, 0.0, 0.0, 0.01, 0.01, 1.0, 0.5, 2)) == math.inf
    assert float(certified_radius(1.0, 0.0, 0.0, 5.0, 5.0, 1.0, 0.5, 2)) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"p": 1.0}, ValueError, r"p must lie in \(0, 1\)"),
        ({"p": 0.0}, ValueError, r"p must lie in \(0, 1\)"),
        ({"r": 0.0}, ValueError, "r must be a finite number > 0"),
        ({"r": -1.0}, ValueError, "r must be a finite number > 0"),
        ({"a": -1.0}, ValueError, "a must be >= 0"),
        ({"b": float("nan")}, ValueError, "b contains NaN"),
        ({"c": float("inf")}, ValueError, "c must be finite"),
        ({"latent_dim": 0}, ValueError, "latent_dim must be >= 1"),
        ({"sigma_l2": float("nan")}, ValueError, "sigma_l2 contains NaN"),
        ({"sigma_l2": torch.ones(3), "sigma_inf": torch.ones(2)}, ValueError, "must broadcast"),
        ({"bound": "paper", "p": 0.9}, ValueError, "p = 1/2"),
        ({"bound": "hoeffding"}, ValueError, "bound must be one of"),
        ({"sigma_inf": 1.0, "sigma_l2": 0.5}, ValueError, "sigma_inf"),
        ({"a": "big"}, TypeError, "a must be a number or a tensor"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = {
        "a": 1.0,
        "b": 1.0,
        "c": 1.0,
        "sigma_l2": 0.1,
        "sigma_inf": 0.1,
        "r": 1.0,
        "p": 0.5,
        "latent_dim": 4,
        **kwargs,
    }
    with pytest.raises(exc, match=match):
        certified_radius(**args)


def test_extreme_constants_stay_sound_and_finite():
    zero_b = float(certified_radius(1.0, 0.0, 1.0, 0.1, 0.1, 8.0, 0.5, 10, "chi2"))
    tiny_b = float(certified_radius(1.0, 1e-310, 1.0, 0.1, 0.1, 8.0, 0.5, 10, "chi2"))
    assert tiny_b == pytest.approx(zero_b, rel=1e-12) and math.isfinite(tiny_b)
    for bound in ("best", "paper"):
        value = float(certified_radius(1e-160, 1.0, 1.0, 0.1, 0.1, 8.0, 0.5, 10, bound))
        assert not math.isnan(value)
    assert float(certified_radius(0.0, 1.0, 1.0, 0.1, 0.1, 8.0, 0.5, 10, "paper")) == math.inf


def test_sigma_inf_too_small_for_the_latent_size():
    with pytest.raises(ValueError, match="sigma_inf must be >= sigma_l2 / sqrt"):
        certified_radius(1.0, 1.0, 1.0, 1.0, 0.1, 8.0, 0.5, 10)
