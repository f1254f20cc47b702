"""lipschitz_bound and export: exact products of float64 norms, never below an ascent."""

import math
import random

import numpy as np
import pytest
import torch
from helpers import lipschitz_ascent
from torch import nn

import crvae_ext
from crvae_ext import GroupSort, LipLinear, MaxMin, export, lipschitz_bound, reference


def test_plain_stack_is_product_of_exact_norms():
    net = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6), nn.Sigmoid(), nn.Linear(6, 2))
    expected = math.prod(reference.spectral_norm_exact(net[i].weight) for i in (0, 2, 4)) * 0.25
    assert lipschitz_bound(net) == pytest.approx(expected, rel=1e-10)
    assert lipschitz_bound(net) >= expected


def test_leaky_relu_and_elu_constants():
    assert lipschitz_bound(nn.LeakyReLU(3.0)) == 3.0
    assert lipschitz_bound(nn.LeakyReLU(0.1)) == 1.0
    assert lipschitz_bound(nn.ELU(alpha=2.0)) == 2.0


def _lip_stack(method: str) -> nn.Sequential:
    torch.manual_seed(1)
    layers = [
        LipLinear(12, 16, lipschitz=1.5, method=method),
        GroupSort(4),
        LipLinear(16, 16, lipschitz=2.0, method=method),
        MaxMin(),
        LipLinear(16, 5, lipschitz=0.5, method=method),
    ]
    for layer in layers:
        if isinstance(layer, LipLinear):
            with torch.no_grad():
                layer.weight.copy_(torch.randn_like(layer.weight))
            layer.converge_()
    return nn.Sequential(*layers).double().eval()


@pytest.mark.parametrize("method", ["spectral", "bjorck"])
def test_lipschitz_stack_bound(method):
    net = _lip_stack(method)
    bound = lipschitz_bound(net)
    assert bound == pytest.approx(1.5 * 2.0 * 0.5, rel=1e-4)
    assert lipschitz_ascent(net, 12) <= bound


def test_plain_stack_ascent_below_bound():
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4), nn.LeakyReLU(0.2)).double()
    assert lipschitz_ascent(net, 8) <= lipschitz_bound(net)


@pytest.mark.parametrize("method", ["spectral", "bjorck"])
def test_export_replaces_lipschitz_layers(method):
    net = _lip_stack(method).float()
    plain = export(net)
    assert not any(isinstance(m, LipLinear) for m in plain.modules())
    assert any(isinstance(m, LipLinear) for m in net.modules())  # original untouched
    x = torch.randn(9, 12)
    assert torch.allclose(plain(x), net(x), atol=1e-6)
    assert lipschitz_bound(plain) == pytest.approx(lipschitz_bound(net), rel=1e-6)


def test_export_single_layer():
    layer = LipLinear(5, 3).eval()
    assert type(export(layer)) is nn.Linear


def test_unknown_module_is_an_error():
    with pytest.raises(TypeError, match="no sound bound is known for GELU"):
        lipschitz_bound(nn.Sequential(nn.Linear(2, 2), nn.GELU()))


def test_register_bound_extends():
    class Halve(nn.Module):
        def forward(self, x):
            return x / 2

    crvae_ext.register_bound(Halve)(lambda m: 0.5)
    assert lipschitz_bound(nn.Sequential(Halve(), Halve())) == 0.25


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_an_error(bad):
    linear = nn.Linear(3, 3)
    with torch.no_grad():
        linear.weight[0, 0] = bad
    with pytest.raises(ValueError, match=r"Linear.weight contains NaN or inf"):
        lipschitz_bound(linear)
    layer = LipLinear(3, 3)
    with torch.no_grad():
        layer.weight[1, 1] = bad
    with pytest.raises(ValueError, match=r"LipLinear.weight contains NaN or inf"):
        layer.lipschitz_bound()


def test_not_a_module_is_an_error():
    with pytest.raises(TypeError, match=r"module must be an nn.Module"):
        lipschitz_bound(torch.eye(3))


def test_subclass_with_its_own_forward_is_not_guessed():
    class Doubled(nn.Sequential):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(TypeError, match="no sound bound is known for Doubled"):
        lipschitz_bound(Doubled(nn.Linear(3, 3)))


def _random_activation(kind: str, rng: random.Random) -> nn.Module:
    """An activation with random parameters of either sign (the ranges the bounds accept)."""
    if kind == "leaky_relu":
        return nn.LeakyReLU(rng.uniform(-5, 5))
    if kind == "elu":
        return nn.ELU(alpha=rng.uniform(-5, 5))
    if kind == "softplus":
        beta = rng.choice((-1, 1)) * 10 ** rng.uniform(-1, 1)
        return nn.Softplus(beta=beta, threshold=rng.uniform(15, 30))
    if kind == "hardtanh":
        low = rng.uniform(-3, 2)
        return nn.Hardtanh(low, low + rng.uniform(0.1, 3))
    return {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[kind]()


@pytest.mark.parametrize(
    "kind", ["leaky_relu", "elu", "softplus", "hardtanh", "relu", "tanh", "sigmoid"]
)
def test_activation_bound_covers_every_sampled_slope(kind):
    """Property: for random parameters, no slope |f'(x)| (float64 autograd, on a fine grid and
    random points over [-40, 40]) and no difference quotient of nearby points exceeds the bound."""
    rng = random.Random(kind)
    grid = torch.linspace(-40, 40, 80_001, dtype=torch.float64)
    for _ in range(25):
        module = _random_activation(kind, rng)
        bound = lipschitz_bound(module)
        x = torch.cat([grid, 80 * torch.rand(20_000, dtype=torch.float64) - 40, -grid.abs()[:50]])
        x.requires_grad_(True)
        (slope,) = torch.autograd.grad(module(x).sum(), x)
        assert float(slope.abs().max()) <= bound, module
        if kind != "softplus":  # torch's switch to the identity: see test_softplus_switch_jump
            with torch.no_grad():
                a, h = x.detach()[:-1], 1e-3
                quotient = (module(a + h) - module(a)).abs() / h
            assert float(quotient.max()) <= bound * (1 + 1e-9), module


def test_elu_with_negative_alpha_is_bounded_by_its_size():
    assert lipschitz_bound(nn.ELU(alpha=-5.0)) == 5.0
    assert lipschitz_bound(nn.LeakyReLU(-2.0)) == 2.0


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (nn.LeakyReLU(float("nan")), "negative_slope=nan: no Lipschitz bound"),
        (nn.ELU(alpha=float("inf")), "alpha=inf: no Lipschitz bound"),
        (nn.Softplus(beta=0.0), "beta=0 divides by zero"),
        (nn.Softplus(threshold=5.0), r"threshold=5\) jumps by 0.00672"),
        (nn.Softplus(threshold=-1.0), "has no Lipschitz bound"),
    ],
)
def test_activations_without_a_bound_are_refused(module, match):
    with pytest.raises(ValueError, match=match):
        lipschitz_bound(module)


def test_softplus_switch_jump():
    """The accepted Softplus jump is below the fp32 rounding of the output at the switch."""
    t = 20.0
    x = torch.tensor([t - 1e-9, t + 1e-9], dtype=torch.float64)
    jump = abs(float(nn.Softplus(threshold=t)(x).diff()) - 2e-9)
    assert 0 < jump <= 2.1e-9 and jump / t <= torch.finfo(torch.float32).eps / 2


def test_spectral_norm_exact_matches_numpy():
    w = torch.randn(30, 17)
    assert reference.spectral_norm_exact(w) == pytest.approx(
        np.linalg.norm(w.double().numpy(), 2), rel=1e-14
    )


@pytest.mark.parametrize(
    "shape", [(7, 3, 5), (40, 10, 64), (1, 4, 1), (20, 10, 64), (900, 10, 700)]
)
def test_product_norm_bound_covers_the_exact_product(shape):
    """Both paths: the full product (2k >= min(m, n)) and the thin one through a QR of L."""
    m, k, n = shape
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        left = torch.randn(m, k, generator=gen, dtype=torch.float64)
        right = torch.randn(k, n, generator=gen, dtype=torch.float64)
        exact = float(np.linalg.norm(left.numpy() @ right.numpy(), 2))
        bound = crvae_ext.bounds.product_norm_bound(left, right)
        assert exact <= bound <= exact * (1 + 1e-10)


def test_projection_onto_a_ball_contracts_outside_it():
    """Dunkl-Williams: P_S is (S / rho)-Lipschitz on {|w| >= rho}, rho > S (the projection-aware
    std-head constant rests on it): sampled pairs, near pairs and antipodal-ish pairs."""
    from crvae_ext import L2BallProjection

    proj = L2BallProjection(0.1)
    gen = torch.Generator().manual_seed(0)
    for rho in (0.11, 0.5, 3.0):
        w = torch.randn(20_000, 6, generator=gen, dtype=torch.float64)
        radii = rho + torch.rand(20_000, 1, generator=gen, dtype=torch.float64) ** 4
        w = w / w.norm(dim=1, keepdim=True) * radii
        near = w + 1e-3 * torch.randn(w.shape, generator=gen, dtype=torch.float64)
        norms = near.norm(dim=1, keepdim=True)
        near = near * (norms.clamp_min(rho) / norms)
        for other in (near, w.roll(1, 0), -w.roll(7, 0)):
            ratio = (proj(w) - proj(other)).norm(dim=1) / (w - other).norm(dim=1)
            assert float(ratio.max()) <= 0.1 / rho * (1 + 1e-9)


def _tight_vae(seed: int = 0):
    from crvae_ext import LipschitzVAE

    torch.manual_seed(seed)
    model = LipschitzVAE(6, 2, hidden=(8,), lipschitz_decoder=3.0, lipschitz_mean=2.0,
                         lipschitz_std=1.0, sigma_max=0.05).double().eval()  # fmt: skip
    return model


def test_joint_mean_bound_covers_the_mean_path():
    """a * b_joint bounds decoder(mu(x)) (found by ascent; a float64 net), and b_joint <= b."""
    for seed in range(3):
        model = _tight_vae(seed)
        consts = model.certificate_constants()
        assert consts.b_joint <= consts.b
        composite = torch.nn.Sequential(model.mean_net, model.decoder)
        assert lipschitz_ascent(composite, 6) <= consts.a * consts.b_joint * (1 + 1e-9)


def test_projection_aware_constant_covers_the_std_head_over_the_ball():
    """Over the ball of radius t around x the std head moves by at most effective_c(t) |d|:
    an ascent on |sigma(x + d) - sigma(x)| / |d| with |d| <= t."""
    from crvae_ext.radius import effective_c

    model = _tight_vae(1)
    with torch.no_grad():  # sigmoid outputs near 1: |v(x)| well above S
        model.std_net[0][-1].bias.fill_(3.0)
    consts = model.certificate_constants()
    x = torch.rand(8, 6, dtype=torch.float64)
    v_norm = model.std_net[:-1](x).norm(dim=1).detach()
    assert (v_norm > consts.sigma_cap).all()  # the case the bound is about
    for t in (0.01, 0.1, 1.0):
        d = (t * torch.randn(8, 6, dtype=torch.float64) / 6**0.5).requires_grad_(True)
        opt = torch.optim.Adam([d], lr=t / 20)
        best = torch.zeros(8, dtype=torch.float64)
        for _ in range(200):
            with torch.no_grad():  # stay in the ball
                d.mul_(t / d.norm(dim=1, keepdim=True).clamp_min(t))
            ratio = (model.std_net(x + d) - model.std_net(x)).norm(dim=1) / d.norm(dim=1)
            best = torch.maximum(best, ratio.detach())
            opt.zero_grad()
            (-ratio.sum()).backward()
            opt.step()
        bound = effective_c(torch.tensor(t, dtype=torch.float64), torch.tensor(consts.c),
                            (torch.tensor(consts.sigma_cap), v_norm))  # fmt: skip
        assert (best <= bound * (1 + 1e-9)).all()
        assert (bound < consts.c).any() or t == 1.0
