"""lipschitz_bound and export: exact products of float64 norms, never below an ascent."""

import math

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
