"""Attacks: they find damage, respect the ball and the box, and never beat a sound certificate."""

from types import SimpleNamespace

import pytest
import torch

from crvae_ext import LipschitzVAE, StandardVAE, certify
from crvae_ext.attacks import (
    empirical_margin,
    expected_damage,
    gaussian_kl_pair,
    latent_space,
    max_damage,
    project,
)

pytest.importorskip("sklearn")
from train_setup import small_data, small_vae

from crvae_ext.train import TrainConfig, train


@pytest.fixture(scope="module")
def trained():
    # module-scoped: built before conftest's per-test seed, and torch seeds each process at
    # random, so the initialisation is seeded here
    torch.manual_seed(0)
    data = small_data(512)
    standard = StandardVAE(64, 4, hidden=(32, 32))
    lipschitz = small_vae()
    for model in (standard, lipschitz):
        torch.manual_seed(0)
        train(model, data, TrainConfig(epochs=20, batch_size=64, lr=3e-3, progress=False))
    return {"standard": standard, "lipschitz": lipschitz, "x": data.images[:12]}


def test_max_damage_finds_damage_on_a_standard_vae(trained):
    model, x = trained["standard"], trained["x"]
    torch.manual_seed(1)
    attack = max_damage(model, x, 1.0, steps=40)
    random = torch.randn_like(x)
    random = project(x, random / random.norm(dim=1, keepdim=True), torch.ones(12, 1), (0.0, 1.0))
    with torch.no_grad():
        base = expected_damage(model.eval(), x, torch.zeros_like(x), 64)
        rand = expected_damage(model, x, random, 64)
        found = expected_damage(model, x, attack.delta, 64)
    assert found.mean() > 1.5 * rand.mean() and found.mean() > 1.5 * base.mean()


@pytest.mark.parametrize("radius", [0.3, torch.linspace(0.1, 2.0, 12)])
def test_attacks_respect_ball_and_box(trained, radius):
    x = trained["x"]
    bound = torch.as_tensor(radius).expand(12)
    for result in (
        max_damage(trained["lipschitz"], x, radius, steps=10),
        latent_space(trained["lipschitz"], x, x.roll(1, 0), radius, steps=10),
    ):
        assert (result.delta.norm(dim=1) <= bound).all()
        moved = x + result.delta
        assert moved.min() >= 0 and moved.max() <= 1


def test_latent_attack_moves_towards_the_target(trained):
    model, x = trained["standard"], trained["x"]
    target = x.roll(3, 0)
    result = latent_space(model, x, target, 2.0, steps=60)
    with torch.no_grad():
        mu, sigma = model.encode(x)
        mu_t, sigma_t = model.encode(target)
        start = gaussian_kl_pair(mu, sigma, mu_t, sigma_t)
        mu2, sigma2 = model.encode(x + result.delta)
        assert torch.allclose(gaussian_kl_pair(mu2, sigma2, mu_t, sigma_t), result.objective)
    assert (result.objective < start).all()


@pytest.mark.parametrize("kind", ["lipschitz", "standard"])
def test_margin_is_never_below_the_certificate(trained, kind):
    model, x = trained[kind], trained["x"][:8]
    torch.manual_seed(2)
    margin = empirical_margin(model, x, r=1.0, p=0.5, n_samples=128, bisection_steps=8)
    cert = certify(model, x, r=1.0, p=0.5).radius
    assert torch.isfinite(margin.margin).any()  # the attack does break robustness somewhere
    assert (cert <= margin.margin).all()
    broken = torch.isfinite(margin.margin) & (margin.margin > 0)
    assert (margin.probability[broken] < 0.5).all()


def test_bad_input(trained):
    model, x = trained["lipschitz"], trained["x"]
    with pytest.raises(ValueError, match="radius must be >= 0"):
        max_damage(model, x, -1.0)
    with pytest.raises(ValueError, match="one value per input"):
        max_damage(model, x, torch.ones(3))
    with pytest.raises(TypeError, match="cannot attack Linear"):
        max_damage(torch.nn.Linear(64, 64), x, 1.0)
    with pytest.raises(ValueError, match="x_target must have x's shape"):
        latent_space(model, x, x[:2], 1.0)
    with pytest.raises(ValueError, match="min_radius must be below max_radius"):
        empirical_margin(model, x, 1.0, min_radius=5.0, max_radius=1.0)
    with pytest.raises(ValueError, match="min_radius must be a finite number > 0"):
        empirical_margin(model, x, 1.0, min_radius=0.0)
    with pytest.raises(ValueError, match=r"x lies outside the box \(0.0, 1.0\)"):
        max_damage(model, x * 3 - 1, 1.0)
    with pytest.raises(ValueError, match="low < high"):
        max_damage(model, x, 1.0, box=(1.0, 0.0))


def test_margin_counts_a_break_below_max_radius(monkeypatch, trained):
    """Attack strength need not grow with the radius (Monte Carlo, local optima): a radius that
    broke robustness is a margin even when the largest radius did not."""
    import crvae_ext.attacks as attacks

    def fake_damage(vae, x, radius, *args, **kwargs):
        radius = torch.as_tensor(radius, dtype=x.dtype).reshape(-1, 1)
        return attacks.AttackResult(radius.expand_as(x).clone(), radius.flatten())

    def fake_probability(vae, x, delta, r, n):
        radius = delta[:, 0]
        est = torch.where((radius > 1.0) & (radius < 5.0), 0.1, 0.9).double()
        return SimpleNamespace(estimate=est)

    monkeypatch.setattr(attacks, "max_damage", fake_damage)
    monkeypatch.setattr(attacks, "robustness_probability", fake_probability)
    x = trained["x"][:3]
    result = attacks.empirical_margin(trained["lipschitz"], x, 1.0, max_radius=8.0)
    assert torch.isfinite(result.margin).all() and (result.margin > 1.0).all()
    assert (result.margin < 5.0).all() and (result.probability < 0.5).all()


@pytest.mark.parametrize("method", ["spectral", "bjorck"])
def test_inference_mode_forward_does_not_break_later_attacks(method):
    """An eval forward under torch.inference_mode fills the layers' caches; input gradients
    afterwards (the attacks) must still work."""
    torch.manual_seed(0)
    model = small_vae()
    if method == "bjorck":
        model = LipschitzVAE(64, 4, hidden=(16, 16), method="bjorck", sigma_max=0.3)
    x = small_data(4).images
    model.eval()
    with torch.inference_mode():
        model.encode(x)
    result = max_damage(model, x, 0.5, steps=3, samples=2)
    assert torch.isfinite(result.objective).all() and (result.delta.norm(dim=1) <= 0.5).all()


def test_non_finite_input_is_refused(trained):
    x = small_data(2).images.clone()
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        max_damage(trained["lipschitz"], x, 0.5)
