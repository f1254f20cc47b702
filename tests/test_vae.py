"""LipschitzVAE: separate networks, sound constants, the sigma cap, the ELBO, targets."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import lipschitz_ascent
from scipy import integrate
from torch import nn

from crvae_ext import (
    ConvLipschitzVAE,
    L2BallProjection,
    LipLinear,
    LipschitzVAE,
    RobustnessTarget,
    a_priori_radius,
    certify,
    reference,
)
from crvae_ext.likelihoods import log_likelihood


def _exact_chain(net: nn.Module) -> float:
    """Product of float64 SVD norms of the eval weights, 1/4 per sigmoid (independent oracle)."""
    total = 1.0
    for m in net.modules():
        if isinstance(m, LipLinear):
            total *= reference.spectral_norm_exact(m.effective_weight())
        elif isinstance(m, nn.Sigmoid):
            total *= 0.25
    return total


@pytest.fixture
def vae() -> LipschitzVAE:
    torch.manual_seed(0)
    return LipschitzVAE(
        20,
        4,
        hidden=(16, 16),
        lipschitz_decoder=3.0,
        lipschitz_mean=2.0,
        lipschitz_std=0.5,
        sigma_max=0.2,
    )


def test_three_separate_networks(vae):
    ids = [{id(p) for p in net.parameters()} for net in (vae.mean_net, vae.std_net, vae.decoder)]
    assert ids[0].isdisjoint(ids[1]) and ids[0].isdisjoint(ids[2]) and ids[1].isdisjoint(ids[2])


def test_constants_match_budgets_and_exact_norms(vae):
    a, b, c = vae.lipschitz_constants()
    assert (a, b, c) == pytest.approx((3.0, 2.0, 0.5), rel=1e-5)
    assert a == pytest.approx(_exact_chain(vae.decoder), rel=1e-6)
    assert b == pytest.approx(_exact_chain(vae.mean_net), rel=1e-6)
    assert c == pytest.approx(_exact_chain(vae.std_net), rel=1e-6)


def test_sigma_is_capped_and_elbo_finite_for_extreme_inputs(vae):
    x = torch.cat([torch.rand(8, 20), 100 * torch.randn(8, 20)])
    _, sigma = vae.encode(x)
    assert (sigma[:8] > 0).all() and (sigma >= 0).all()
    assert (sigma.norm(dim=1) <= 0.2 * (1 + 1e-6)).all()
    torch.manual_seed(0)
    steep = LipschitzVAE(20, 4, hidden=(16,), lipschitz_decoder=1e3, lipschitz_mean=1e3,
                         lipschitz_std=1e3, sigma_max=0.2)  # fmt: skip
    pixels = torch.rand(16, 20)
    _, sigma = steep.encode(pixels)
    assert (steep.decoder[0](steep.encode(pixels)[0]).abs().amax(1) > 50).all()  # saturated
    assert torch.isfinite(steep.elbo(pixels)).all()  # saturated sigmoids: logits, clamped log
    gaussian = LipschitzVAE(20, 4, hidden=(16, 16), likelihood="gaussian", sigma_max=0.2)
    assert torch.isfinite(gaussian.elbo(x)).all()


@pytest.mark.parametrize("likelihood", ["continuous_bernoulli", "bernoulli"])
def test_bernoulli_likelihoods_refuse_data_outside_the_unit_interval(likelihood):
    model = LipschitzVAE(20, 4, hidden=(16,), likelihood=likelihood)
    with pytest.raises(ValueError, match=rf"x must lie in \[0, 1\] for the {likelihood}"):
        model.elbo(torch.randint(0, 256, (4, 20)).float())  # raw 0..255 pixels
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        model.elbo(torch.full((2, 20), float("nan")))


def test_beta_must_be_finite(vae):
    with pytest.raises(ValueError, match="beta must be a finite number >= 0, got inf"):
        vae.elbo(torch.rand(2, 20), beta=float("inf"))


def test_decoder_output_ranges():
    torch.manual_seed(0)
    z = 10 * torch.randn(6, 3)
    bern = LipschitzVAE(8, 3, hidden=(8,), lipschitz_decoder=4.0)
    out = bern.decode(z)
    assert ((out >= 0) & (out <= 1)).all()
    gauss = LipschitzVAE(8, 3, hidden=(8,), likelihood="gaussian")
    assert isinstance(gauss.decoder[1], nn.Identity)


def _cb_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Continuous Bernoulli log density in float64; the normaliser by numerical quadrature of
    lam^t (1 - lam)^(1 - t) over [0, 1] (independent of any closed form)."""
    eta, x = logits.detach().double(), x.double()
    log_lam, log_1m = F.logsigmoid(eta), F.logsigmoid(-eta)
    log_norm = torch.tensor(
        [
            -math.log(
                integrate.quad(
                    lambda t, a=a, b=b: math.exp(t * a + (1 - t) * b), 0, 1, epsabs=0, epsrel=1e-12
                )[0]
            )
            for a, b in zip(log_lam.flatten().tolist(), log_1m.flatten().tolist(), strict=True)
        ],
        dtype=torch.float64,
    ).view_as(eta)
    return (x * log_lam + (1 - x) * log_1m + log_norm).sum(-1)


def test_elbo_matches_closed_form(vae):
    x = torch.rand(5, 20)
    torch.manual_seed(3)
    got = vae.elbo(x, beta=0.7)
    torch.manual_seed(3)
    mu, sigma = vae.encode(x)
    logits = vae.decoder[0](mu + sigma * torch.randn_like(mu))
    kl = 0.5 * (mu.double() ** 2 + sigma.double() ** 2 - 1 - 2 * torch.log(sigma.double())).sum(-1)
    expected = _cb_log_prob(logits, x) - 0.7 * kl
    assert got.shape == (5,)
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("eta", [0.0, 1e-4, 5e-3, 0.02, 1.0, 15.0, 40.0, -80.0])
def test_continuous_bernoulli_normaliser(eta):
    logits = torch.tensor([eta], dtype=torch.float64)
    got = float(log_likelihood("continuous_bernoulli", logits, torch.zeros(1, dtype=torch.float64)))
    assert got == pytest.approx(float(_cb_log_prob(logits, torch.zeros(1))), rel=1e-9, abs=1e-9)


def test_gaussian_and_bernoulli_elbo():
    torch.manual_seed(0)
    x = torch.rand(3, 6)
    for likelihood in ("gaussian", "bernoulli"):
        model = LipschitzVAE(6, 2, hidden=(4,), likelihood=likelihood)
        torch.manual_seed(1)
        got = model.elbo(x, beta=0.0)
        torch.manual_seed(1)
        mu, sigma = model.encode(x)
        out = model.decoder[0](mu + sigma * torch.randn_like(mu)).double()
        xd = x.double()
        if likelihood == "gaussian":
            expected = -0.5 * ((xd - out) ** 2).sum(-1) - 3 * math.log(2 * math.pi)
        else:
            p = torch.sigmoid(out)
            expected = (xd * torch.log(p) + (1 - xd) * torch.log1p(-p)).sum(-1)
        assert torch.allclose(got.double(), expected, atol=1e-4)


def test_images_are_flattened(vae):
    x = torch.rand(3, 1, 4, 5)
    mu, _ = vae.encode(x)
    assert mu.shape == (3, 4) and torch.allclose(mu, vae.encode(x.flatten(1))[0])
    recon, _, _ = vae(x)
    assert recon.shape == (3, 20)


def test_from_target_meets_target_and_enforce_repairs_drift():
    torch.manual_seed(0)
    target = RobustnessTarget(radius=0.05, r=4.0, p=0.5)
    vae = LipschitzVAE.from_target(12, 3, target, sigma_max=0.1, hidden=(8, 8))
    check = vae.verify_target()
    assert check.met and check.radius >= 0.05
    opt = torch.optim.SGD(vae.parameters(), lr=0.5)  # big steps: sigma_hat lags the weights
    x = torch.rand(16, 12)
    for _ in range(3):
        opt.zero_grad()
        (-vae.elbo(x).mean()).backward()
        opt.step()
    vae.eval()
    repaired = vae.enforce_target()
    assert repaired.met
    for bound, budget in zip(vae.lipschitz_constants(), vae.budgets, strict=True):
        assert bound <= budget
    assert a_priori_radius(vae, 4.0, 0.5) >= 0.05


def test_state_dict_round_trip(vae):
    vae.eval()
    other = LipschitzVAE(20, 4, hidden=(16, 16), sigma_max=0.2)
    other.load_state_dict(vae.state_dict())
    other.eval()
    x = torch.rand(4, 20)
    assert torch.equal(other.encode(x)[0], vae.encode(x)[0])
    assert other.lipschitz_constants() == vae.lipschitz_constants()


def test_bjorck_vae():
    torch.manual_seed(0)
    model = LipschitzVAE(10, 2, hidden=(8,), method="bjorck", lipschitz_mean=1.5)
    assert model.lipschitz_constants().b == pytest.approx(1.5, rel=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"hidden": (15,)}, ValueError, "group_size=2 must divide every hidden size"),
        ({"likelihood": "poisson"}, ValueError, "likelihood must be one of"),
        ({"sigma_max": 0.0}, ValueError, "sigma_max must be a finite number > 0"),
        ({"lipschitz_std": -1.0}, ValueError, "lipschitz_std must be a finite number > 0"),
        ({"latent_dim": 0}, ValueError, "latent_dim must be >= 1"),
    ],
)
def test_bad_construction(kwargs, exc, match):
    args = {"input_dim": 8, "latent_dim": 2, "hidden": (8,), **kwargs}
    with pytest.raises(exc, match=match):
        LipschitzVAE(**args)


def test_bad_input(vae):
    with pytest.raises(ValueError, match="x must have shape"):
        vae.encode(torch.rand(3, 21))
    with pytest.raises(TypeError, match="floating-point"):
        vae.encode(torch.ones(3, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="no target"):
        vae.verify_target()
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        vae.elbo(torch.rand(2, 20), beta=-1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_projection_never_exceeds_the_cap_after_rounding(dtype):
    proj = L2BallProjection(0.1)
    x = torch.rand(20_000, 10, dtype=torch.float64) * 5
    norms = proj(x.to(dtype)).double().norm(dim=1)
    assert (norms <= 0.1).all()
    assert norms.max() > 0.1 * (1 - 4 * torch.finfo(dtype).eps)  # still projects onto ~S


def test_from_target_without_margin_still_meets_the_target():
    torch.manual_seed(1)
    target = RobustnessTarget(radius=0.05, r=4.0, p=0.5)
    for method in ("spectral", "bjorck"):
        vae = LipschitzVAE.from_target(12, 3, target, hidden=(8,), margin=0.0, method=method)
        assert vae.verify_target().met


def test_sigma_cap_and_latent_dim_are_read_only(vae):
    with pytest.raises(AttributeError):
        vae.sigma_max = 0.01
    with pytest.raises(AttributeError):
        vae.latent_dim = 1
    assert vae.sigma_max == 0.2 and vae.latent_dim == 4


def test_group_size_zero_is_a_clear_error():
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        LipschitzVAE(8, 2, hidden=(8,), group_size=0)


def _conv_vae(**kwargs):
    torch.manual_seed(0)
    return ConvLipschitzVAE(64, 3, channels=(4, 8), **kwargs)


def test_conv_vae_shapes_and_constants_are_sound():
    vae = _conv_vae(lipschitz_decoder=2.0, lipschitz_mean=1.5, lipschitz_std=0.5).double()
    vae.eval()
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    mu, sigma = vae.encode(x)
    assert mu.shape == (5, 3) and sigma.shape == (5, 3)
    assert vae.decode(mu).shape == (5, 64)
    a, b, c = vae.lipschitz_constants()
    # each network's bound is the product of its layers' exact operator-norm bounds, close to
    # its budget (power iteration on each operator) and above any slope an ascent finds
    assert 2.0 * 0.999 <= a <= 2.0 * 1.6 and 1.5 * 0.999 <= b <= 1.5 * 1.6
    assert lipschitz_ascent(vae.mean_net, 64, steps=200) <= b
    assert lipschitz_ascent(vae.decoder, 3, steps=200) <= a
    assert lipschitz_ascent(vae.std_net, 64, steps=200) <= c


def test_conv_vae_from_target_checkpoint_and_certify(tmp_path):
    from crvae_ext.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    target = RobustnessTarget(radius=0.05, r=4.0, p=0.5)
    vae = ConvLipschitzVAE.from_target(64, 3, target, channels=(4, 8))
    assert vae.verify_target().met
    x = torch.rand(16, 64)
    opt = torch.optim.SGD(vae.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        (-vae.elbo(x).mean()).backward()
        opt.step()
    vae.eval()
    assert vae.enforce_target().met
    path = tmp_path / "conv.pt"
    save_checkpoint(path, vae)
    loaded = load_checkpoint(path).model.eval()
    assert type(loaded) is ConvLipschitzVAE and loaded.config["channels"] == [4, 8]
    assert torch.equal(loaded.encode(x)[0], vae.encode(x)[0])
    assert loaded.lipschitz_constants() == vae.lipschitz_constants()
    res = certify(loaded, x, r=4.0, p=0.5)
    assert bool((res.radius >= 0.05).all())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"channels": (3, 8)}, "group_size=2 must divide"),
        ({"channels": ()}, "at least one"),
        ({"channels": (4, 8, 8, 8)}, "divisible by 2\\^4"),
        ({"image_shape": (2, 8, 8)}, "C\\*H\\*W = 64"),
    ],
)
def test_conv_vae_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvLipschitzVAE(64, 3, **({"channels": (4, 8)} | kwargs))
    with pytest.raises(ValueError, match="not a square image"):
        ConvLipschitzVAE(60, 3)
