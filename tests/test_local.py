"""The local decoder bound (certify's mode "tight") against exact computation on small float64
nets: dense grids of exact Jacobians over the ball (autograd), pair orders sampled over the ball,
difference quotients, the general and the three-layer path, and certificates against attacks."""

import itertools
import math

import pytest
import torch
from torch import nn

from crvae_ext import GroupSort, LipLinear, LipschitzVAE, certify, radius
from crvae_ext.local import decoder_chain, local_lipschitz


def _decoder(sizes, sigmoid=True, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(LipLinear(fan_in, fan_out, lipschitz=2.5))
        if i < len(sizes) - 2:
            layers.append(GroupSort(2))
    if sigmoid:
        layers.append(nn.Sigmoid())
    return nn.Sequential(*layers).double().eval()


def _ball_points(center: torch.Tensor, rho: float, n: int, gen, grid=True) -> torch.Tensor:
    """Points of B(center, rho): a dense polar grid in 2-D, uniform samples otherwise."""
    m = center.shape[0]
    if m == 2 and grid:
        radii = torch.linspace(0, rho, 60, dtype=torch.float64)
        angles = torch.linspace(0, 2 * math.pi, 240, dtype=torch.float64)
        grid = torch.stack([torch.outer(radii, angles.cos()), torch.outer(radii, angles.sin())], -1)
        return center + grid.reshape(-1, 2)
    d = torch.randn(n, m, generator=gen, dtype=torch.float64)
    d = d / d.norm(dim=1, keepdim=True) * rho * torch.rand(n, 1, generator=gen) ** (1 / m)
    return center + d


SHAPES = {"three_layers": (2, 8, 8, 6), "two_layers": (2, 8, 5), "four_layers": (3, 8, 8, 8, 4)}


@pytest.mark.parametrize("sigmoid", [True, False])
@pytest.mark.parametrize("sizes", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("rho", [0.0, 0.05, 0.3, 1.0, 3.0])
def test_bound_covers_every_jacobian_in_the_ball(sizes, sigmoid, rho):
    """max over a dense set of points z in the ball of the exact |J(z)|_2 <= the bound, for
    several centers; and the bound never exceeds the product of the layers' norms."""
    decoder = _decoder(sizes, sigmoid)
    chain = decoder_chain(decoder)
    gen = torch.Generator().manual_seed(1)
    centers = torch.randn(4, sizes[0], generator=gen, dtype=torch.float64)
    bound = local_lipschitz(chain, centers, torch.full((4,), rho, dtype=torch.float64))
    for center, b in zip(centers, bound, strict=True):
        points = _ball_points(center, rho, 4000, gen)
        one = lambda z: decoder(z.unsqueeze(0)).squeeze(0)  # noqa: E731
        jac = torch.func.vmap(torch.func.jacrev(one))(points)
        worst = float(torch.linalg.matrix_norm(jac.detach(), ord=2).max())
        assert worst <= float(b) * (1 + 1e-9), (worst, float(b))
        if rho == 0:  # a point: every pair stable, the bound is the Jacobian's norm there
            assert float(b) <= worst * (1 + 1e-7) + 1e-12  # (the forward-rounding slacks)


@pytest.mark.parametrize("sizes", [SHAPES["three_layers"], SHAPES["four_layers"]])
def test_difference_quotients_inside_the_ball_stay_below(sizes):
    decoder = _decoder(sizes)
    chain = decoder_chain(decoder)
    gen = torch.Generator().manual_seed(2)
    center = torch.randn(1, sizes[0], generator=gen, dtype=torch.float64)
    rho = 0.7
    bound = float(local_lipschitz(chain, center, torch.tensor([rho], dtype=torch.float64)))
    a = _ball_points(center[0], rho, 20_000, gen, grid=False)
    b = a + 0.05 * torch.randn(a.shape, generator=gen, dtype=torch.float64)
    b = center + (b - center) * (rho / (b - center).norm(dim=1, keepdim=True)).clamp_max(1)
    ratio = (decoder(a) - decoder(b)).norm(dim=1) / (a - b).norm(dim=1)
    assert float(ratio.detach().max()) <= bound * (1 + 1e-9)


def test_tighter_than_the_global_bound_where_it_matters():
    """Near the center a saturated, stable decoder has a much smaller local constant."""
    decoder = _decoder((2, 8, 8, 6))
    chain = decoder_chain(decoder)
    center = torch.zeros(1, 2, dtype=torch.float64)
    small = float(local_lipschitz(chain, center, torch.tensor([1e-3], dtype=torch.float64)))
    assert small < math.prod(chain.norms) * 0.25


def test_other_decoder_shapes_are_not_chains():
    assert decoder_chain(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))) is None
    assert decoder_chain(nn.Sequential(LipLinear(4, 4), GroupSort(4), LipLinear(4, 2))) is None


def test_chi2_quantile_upper_is_checked():
    for m in (1, 2, 10, 50):
        for tail in (0.5, 0.025, 1e-6):
            q = radius.chi2_quantile_upper(m, tail)
            half = torch.tensor([m / 2, q / 2], dtype=torch.float64)
            tail_at_q = float(torch.special.gammaincc(half[0], half[1]))
            assert tail_at_q <= tail and q > 0


@pytest.mark.slow
def test_local_certificates_hold_against_attacks():
    """mode "tight" >= mode "fast" on every input, and an attack at each input's local radius
    keeps P(|Delta| <= r) >= p (Monte Carlo with a one-sided 99.9% interval)."""
    from train_setup import small_data

    from crvae_ext.attacks import max_damage
    from crvae_ext.certify import robustness_probability
    from crvae_ext.train import TrainConfig, train

    torch.manual_seed(0)
    model = LipschitzVAE(64, 4, hidden=(32, 32), lipschitz_decoder=3.0, lipschitz_mean=3.0,
                         lipschitz_std=0.3, sigma_max=0.1)  # fmt: skip
    data = small_data(512)
    train(model, data, TrainConfig(epochs=15, batch_size=64, lr=3e-3, progress=False))
    x = data.images[:24]
    r = 3.0
    fast = certify(model, x, r, 0.5, mode="fast").radius
    local = certify(model, x, r, 0.5, mode="tight").radius
    assert (local >= fast).all() and float(local.median()) > float(fast.median())
    markov = certify(model, x, r, 0.5, bound="markov", mode="tight")
    assert (markov.radius >= certify(model, x, r, 0.5, bound="markov", mode="fast").radius).all()
    assert set(markov.winner) <= {"markov", "local-markov"} and "local-markov" in markov.winner
    attack = max_damage(model, x, local.float(), steps=40, samples=8)
    est = robustness_probability(model, x, attack.delta, r, n_samples=4000, confidence=0.998)
    assert (est.upper >= 0.5).all()


def test_gathered_shares_keep_the_dataset_order(monkeypatch):
    """Under torchrun each process certifies inputs rank, rank + world, ...; the gather puts
    every value (1-D radii and 2-D latent means alike) back in the dataset's order."""
    import sys

    import torch.distributed as dist
    from torch.utils.data import TensorDataset

    certify_module = sys.modules["crvae_ext.certify"]
    data = TensorDataset(torch.arange(5.0).unsqueeze(1))
    mine = (torch.tensor([0.0, 2.0, 4.0]), torch.tensor([[0.0, 0.5], [2.0, 2.5], [4.0, 4.5]]))
    other = (torch.tensor([1.0, 3.0]), torch.tensor([[1.0, 1.5], [3.0, 3.5]]))
    monkeypatch.setattr(certify_module, "_world", lambda: (0, 2))
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: out.__setitem__(
        slice(None), [list(obj), list(other)]))  # fmt: skip
    flat, means = certify_module._gather(data, *mine)
    assert torch.equal(flat, torch.arange(5.0))
    assert torch.equal(means, torch.arange(5.0).unsqueeze(1) + torch.tensor([0.0, 0.5]))
