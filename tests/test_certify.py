"""certify, a_priori_radius, design and robustness_probability against independent oracles."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from crvae_ext import (
    LipschitzVAE,
    RobustnessTarget,
    StandardVAE,
    a_priori_radius,
    certified_radius,
    certify,
    design,
    robustness_probability,
)
from crvae_ext.certify import clopper_pearson


@pytest.fixture
def vae() -> LipschitzVAE:
    torch.manual_seed(0)
    model = LipschitzVAE(
        16,
        3,
        hidden=(8, 8),
        lipschitz_decoder=2.0,
        lipschitz_mean=1.5,
        lipschitz_std=0.3,
        sigma_max=0.5,
    )
    with torch.no_grad():  # a std head that varies with x, so per-input radii differ
        model.std_net[0][-1].bias.fill_(-3.0)
    return model


def test_certify_matches_the_formula(vae):
    x = torch.rand(7, 16)
    res = certify(vae, x, r=6.0, p=0.7, mode="global")
    vae.eval()
    _, sigma = vae.encode(x)
    s, s_inf = sigma.double().norm(dim=1), sigma.double().amax(dim=1)
    a, b, c = vae.lipschitz_constants()
    expected = certified_radius(a, b, c, s, s_inf, 6.0, 0.7, 3)
    assert torch.equal(res.radius, expected)
    assert res.radius.shape == (7,) and len(res.winner) == 7
    assert len(set(res.radius.tolist())) > 1
    for r_, m_, c_, w in zip(res.radius, res.markov, res.chi2, res.winner, strict=True):
        assert r_ == max(m_, c_) and w == ("markov" if m_ >= c_ else "chi2")


def test_certify_is_batch_independent_and_restores_mode(vae):
    x = torch.rand(5, 16)
    vae.train()
    whole = certify(vae, x, r=6.0).radius
    assert vae.training and all(m.training for m in vae.modules())
    parts = torch.cat([certify(vae, x[i : i + 1], r=6.0).radius for i in range(5)])
    assert torch.allclose(whole, parts, rtol=1e-5)  # only float32 GEMM rounding differs


def test_a_priori_is_below_every_per_input_radius(vae):
    x = torch.rand(20, 16)
    prior = a_priori_radius(vae, r=6.0, p=0.5)
    assert prior == float(certified_radius(*vae.lipschitz_constants(), 0.5, 0.5, 6.0, 0.5, 3))
    assert (certify(vae, x, r=6.0).radius >= prior).all()
    same = a_priori_radius(tuple(vae.lipschitz_constants()), 6.0, sigma_max=0.5, latent_dim=3)
    assert same == prior


def test_design_is_tight_and_prefers_a_small_std_budget():
    target = RobustnessTarget(radius=0.2, r=8.0, p=0.5)
    a, b, c = design(target, latent_dim=10, sigma_max=0.1, std_ratio=0.1)
    assert (a, c) == pytest.approx((b, 0.1 * b))
    assert a_priori_radius((a, b, c), 8.0, sigma_max=0.1, latent_dim=10) >= 0.2
    grown = (1.001 * a, 1.001 * b, 1.001 * c)
    assert a_priori_radius(grown, 8.0, sigma_max=0.1, latent_dim=10) < 0.2
    _, b_big_std, _ = design(target, latent_dim=10, sigma_max=0.1, std_ratio=1.0)
    assert b_big_std < b


class _LinearToy(nn.Module):
    """mu(x) = k x, constant sigma, g(z) = a z: |Delta| = a |z' - z| with z' - z ~
    N(k delta, 2 sigma^2 I), so P(|Delta| <= r) is a noncentral chi-square CDF."""

    latent_dim = 3

    def __init__(self, k: float, sigma: float, a: float) -> None:
        super().__init__()
        self.k, self.sigma, self.a = k, sigma, a

    def encode(self, x):
        return self.k * x, torch.full_like(x, self.sigma)

    def decode(self, z):
        return self.a * z


def test_robustness_probability_matches_noncentral_chi2():
    torch.manual_seed(0)
    toy = _LinearToy(k=2.0, sigma=0.4, a=1.5)
    x = torch.randn(4, 3, dtype=torch.float64)
    delta = 0.3 * torch.randn(4, 3, dtype=torch.float64)
    r = 2.0
    est = robustness_probability(toy, x, delta, r, n_samples=20_000, confidence=0.999)
    var = 2 * 0.4**2
    nc = ((2.0 * delta) ** 2).sum(1).numpy() / var
    exact = stats.ncx2.cdf((r / 1.5) ** 2 / var, df=3, nc=nc)
    assert np.all(est.lower.numpy() <= exact) and np.all(exact <= est.upper.numpy())
    assert est.estimate.shape == (4,) and est.n_samples == 20_000


def test_clopper_pearson_matches_scipy_binomtest():
    for k, n in [(0, 50), (7, 50), (50, 50), (613, 1000)]:
        lo, hi = clopper_pearson(np.array([k]), n, 0.95)
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert lo[0] == pytest.approx(ci.low, abs=1e-12) and hi[0] == pytest.approx(ci.high)


def _digits() -> torch.Tensor:
    datasets = pytest.importorskip("sklearn.datasets")
    return torch.tensor(datasets.load_digits().data / 16.0, dtype=torch.float32)


def _worst_direction(vae, x, radius, steps=20):
    """Projected gradient ascent on |g(mu(x + d)) - g(mu(x))| over |d| = radius."""
    d = torch.randn_like(x)
    for _ in range(steps):
        d = (radius * d / d.norm(dim=1, keepdim=True)).requires_grad_(True)
        gap = (vae.decode(vae.encode(x + d)[0]) - vae.decode(vae.encode(x)[0])).norm(dim=1)
        (grad,) = torch.autograd.grad(gap.sum(), d)
        d = d.detach() + radius * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return radius * d / d.norm(dim=1, keepdim=True)


@pytest.mark.slow
def test_trained_toy_vae_certificate_holds():
    torch.manual_seed(0)
    data = _digits()
    target = RobustnessTarget(radius=0.5, r=4.0, p=0.5)
    vae = LipschitzVAE.from_target(64, 4, target, sigma_max=0.3, hidden=(32, 32))
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        batch = data[torch.randint(0, len(data), (64,))]
        loss = -vae.elbo(batch).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    vae.eval()
    assert vae.enforce_target().met
    x = data[:6]
    res = certify(vae, x, r=4.0, p=0.5)
    assert (res.radius >= 0.5).all()
    with torch.no_grad():
        random_dir = torch.randn_like(x)
    directions = {
        "random": res.radius.float()[:, None] * random_dir / random_dir.norm(dim=1, keepdim=True),
        "gradient": _worst_direction(vae, x, res.radius.float()[:, None]),
    }
    for delta in directions.values():
        assert torch.allclose(delta.norm(dim=1).double(), res.radius, rtol=1e-4)
        est = robustness_probability(vae, x, delta, 4.0, n_samples=2000, confidence=0.999)
        assert (est.upper >= 0.5).all()  # never significantly below p at the certified radius


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda m, x: certify(object(), x, 1.0), TypeError, "cannot certify object"),
        (lambda m, x: certify(nn.Linear(2, 2), x, 1.0), TypeError, "no encode"),
        (lambda m, x: certify(m, x, 1.0, p=1.5), ValueError, r"p must lie in \(0, 1\)"),
        (lambda m, x: certify(m, x, -1.0), ValueError, "r must be a finite number > 0"),
        (lambda m, x: certify(m, x, 1.0, p=0.9, bound="paper"), ValueError, "p = 1/2"),
        (lambda m, x: certify(m, x[:, :5], 1.0), ValueError, "x must have shape"),
        (
            lambda m, x: robustness_probability(m, x, x[:2], 1.0),
            ValueError,
            "delta must be a tensor of x's shape",
        ),
        (
            lambda m, x: robustness_probability(m, x, x, 1.0, confidence=1.0),
            ValueError,
            "confidence must lie in",
        ),
        (lambda m, x: a_priori_radius((1.0, 2.0), 1.0), ValueError, r"\(a, b, c\) triple"),
        (lambda m, x: a_priori_radius((1.0, 2.0, 3.0), 1.0), ValueError, "sigma_max and"),
        (lambda m, x: a_priori_radius(m, 1.0, sigma_max=0.01), ValueError, "read from the model"),
        (lambda m, x: a_priori_radius(m, 1.0, latent_dim=1), ValueError, "read from the model"),
        (
            lambda m, x: a_priori_radius(StandardVAE(16, 3, (8,)), 1.0),
            TypeError,
            "caps no",
        ),
        (lambda m, x: design("target", 3, 0.1), TypeError, "RobustnessTarget"),
        (lambda m, x: certify(m, x * math.nan, 1.0), ValueError, "x contains NaN or inf"),
        (lambda m, x: certify(m, x / 0.0, 1.0), ValueError, "x contains NaN or inf"),
        (
            lambda m, x: robustness_probability(m, x, x * math.nan, 1.0),
            ValueError,
            "delta contains NaN or inf",
        ),
        (
            lambda m, x: robustness_probability(m, x.int(), x, 1.0),
            TypeError,
            "x must be a floating-point tensor",
        ),
    ],
)
def test_bad_input(vae, call, exc, match):
    with pytest.raises(exc, match=match):
        call(vae, torch.rand(3, 16))


class _Unboundable(nn.Module):
    latent_dim = 2

    def encode(self, x):
        return x, x.abs()

    def decode(self, z):
        return z

    def lipschitz_constants(self):
        from crvae_ext import lipschitz_bound

        return lipschitz_bound(nn.GELU()), 1.0, 1.0


def test_model_the_api_cannot_bound():
    with pytest.raises(TypeError, match="no sound bound is known for GELU"):
        certify(_Unboundable(), torch.rand(2, 2), 1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"radius": 0.0}, "radius"), ({"r": math.nan}, "r must"), ({"p": 1.0}, "p must")],
)
def test_bad_target(kwargs, match):
    args = {"radius": 0.1, "r": 1.0, "p": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        RobustnessTarget(**args)


def test_paper_winner_names_its_own_bounds(vae):
    res = certify(vae, torch.rand(4, 16), r=6.0, p=0.5, bound="paper")
    assert set(res.winner) <= {"paper-markov", "paper-inglot"}


def _count_svds(monkeypatch) -> list:
    from crvae_ext import reference

    calls: list = []
    exact = reference.spectral_norm_exact
    monkeypatch.setattr(reference, "spectral_norm_exact", lambda w: calls.append(1) or exact(w))
    return calls


def _fresh_constants(model) -> tuple:
    """The constants of a copy built from the model's state: nothing cached can leak in."""
    import copy

    clone = copy.deepcopy(model)
    clone.invalidate_cache()
    return tuple(clone.certificate_constants())


def test_constants_are_computed_once_per_weight_state(vae, monkeypatch):
    calls = _count_svds(monkeypatch)
    x = torch.rand(6, 16)
    first = certify(vae, x, 6.0)
    n = len(calls)
    assert n > 0
    for _ in range(3):
        again = certify(vae, x, 6.0)
    assert len(calls) == n and torch.equal(first.radius, again.radius)


@pytest.mark.parametrize(
    "change",
    ["sgd_step", "fused_adam_step", "load_state_dict", "no_grad_edit", "new_k", "train_forward"],
)
def test_a_weight_change_is_never_missed(vae, change, monkeypatch):
    x = torch.rand(6, 16)
    before = vae.certificate_constants()
    calls = _count_svds(monkeypatch)
    layer = vae.decoder[0][0]
    if change.endswith("_step"):
        fused = change.startswith("fused")
        opt = (torch.optim.Adam(vae.parameters(), lr=0.05, fused=True) if fused
               else torch.optim.SGD(vae.parameters(), lr=0.5))  # fmt: skip
        vae.eval()
        (vae.decode(vae.encode(x)[0]) * torch.rand(6, 16)).sum().backward()
        opt.step()
    elif change == "load_state_dict":
        torch.manual_seed(5)
        other = LipschitzVAE(16, 3, hidden=(8, 8), lipschitz_decoder=3.0, lipschitz_mean=1.5,
                             lipschitz_std=0.3, sigma_max=0.5)  # fmt: skip
        vae.load_state_dict(other.state_dict())
    elif change == "no_grad_edit":
        with torch.no_grad():
            layer.weight.mul_(1.7)
    elif change == "new_k":
        layer.lipschitz = layer.lipschitz * 0.5
    else:
        vae.train()
        vae.encode(torch.rand(4, 16))  # the power iteration moves: the eval scale moves
    after = vae.certificate_constants()
    assert calls  # recomputed
    if change != "train_forward":  # a converged power iteration barely moves in one step
        assert after != before
    assert tuple(after) == _fresh_constants(vae)
    assert certify(vae, x, 6.0).constants == tuple(after)[:3]


def test_fused_steps_on_any_parameter_are_seen():
    """A fused optimizer bumps no version counter: the gradient counts see its steps, for
    nn.Linear models (StandardVAE) and for a LipschitzVAE whose biases alone are trained."""
    torch.manual_seed(0)
    x = torch.rand(6, 16)
    standard = StandardVAE(16, 3, hidden=(8,))
    lipschitz = LipschitzVAE(16, 3, hidden=(8, 8), lipschitz_decoder=2.0, lipschitz_mean=1.5,
                             lipschitz_std=0.3, sigma_max=0.5)  # fmt: skip
    for model, trained in ((standard, list(standard.parameters())),
                           (lipschitz, [p for n, p in lipschitz.named_parameters()
                                        if n.endswith("bias")])):  # fmt: skip
        for p in model.parameters():
            p.requires_grad_(any(p is q for q in trained))
        model.eval()
        before = model.certificate_constants()
        chain = model.decoder_chain()
        opt = torch.optim.Adam(trained, lr=0.5, fused=True)
        (model.decode(model.encode(x)[0]) * torch.rand(6, 16)).sum().backward()
        opt.step()
        assert tuple(model.certificate_constants()) == _fresh_constants(model)
        if model is standard:
            assert model.certificate_constants() != before
        else:  # the biases moved: the local bound's chain (centres) is rebuilt
            new_chain = model.decoder_chain()
            assert new_chain is not chain
            assert not torch.equal(new_chain.biases[0], chain.biases[0])
