"""torch.compile(fullgraph=True) of LipLinear + GroupSort stacks: no graph break, same numbers."""

import pytest
import torch
from torch import nn

from crvae_ext import GroupSort, LipLinear, MaxMin

DEVICE = "cuda"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spectral", "bjorck"])
def test_compiled_eval_applies_the_certified_map(method):
    """A stale power-iteration state (weights edited, then eval): the compiled eval forward is
    the eager one, whose map lipschitz_bound certifies, also after a later weight edit."""
    torch.manual_seed(0)
    layer = LipLinear(12, 8, lipschitz=1.0, method=method)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(8, 12))  # v is far from the new top singular vector
    layer.eval()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.eye(12)
    for edit in (None, 1.7):
        if edit is not None:
            with torch.no_grad():
                layer.weight.mul_(edit).add_(0.3 * torch.randn(8, 12))
            bound = layer.lipschitz_bound()  # certifies the current weights: refreshes the state
        else:
            bound = layer.lipschitz_bound()
        with torch.no_grad():
            got, want = compiled(x), layer(x)
        assert torch.equal(got, want)
        bias = layer.bias.detach()
        gain = float(torch.linalg.matrix_norm((got - bias).double(), ord=2))
        assert gain <= bound * (1 + 1e-6)


def _stack() -> nn.Sequential:
    return nn.Sequential(LipLinear(16, 32), GroupSort(4), LipLinear(32, 8, lipschitz=2.0), MaxMin())


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    compiled_net, eager_net = _stack(), _stack()
    eager_net.load_state_dict(compiled_net.state_dict())
    compiled = torch.compile(compiled_net, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 16)
    for _ in range(2):  # training: the power-iteration buffers advance inside the graph
        compiled(x).square().sum().backward()
        eager_net(x).square().sum().backward()
    for a, b in zip(compiled_net.parameters(), eager_net.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)
    assert torch.allclose(compiled_net[0].v, eager_net[0].v, atol=1e-6)
    compiled_net.eval()
    eager_net.eval()
    assert torch.allclose(compiled(x), eager_net(x), atol=1e-6)


def _cuda_stack() -> torch.nn.Sequential:
    return torch.nn.Sequential(
        LipLinear(64, 128), GroupSort(4), LipLinear(128, 64, lipschitz=2.0), MaxMin(),
        LipLinear(64, 10),
    ).to(DEVICE)  # fmt: skip


@pytest.mark.gpu
def test_cuda_compile_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    compiled_net, eager_net = _cuda_stack(), _cuda_stack()
    eager_net.load_state_dict(compiled_net.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(compiled_net, fullgraph=True)
    x = torch.randn(32, 64, device=DEVICE)
    for _ in range(2):
        compiled(x).square().sum().backward()
        eager_net(x).square().sum().backward()
    for a, b in zip(compiled_net.parameters(), eager_net.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    compiled_net.eval()
    eager_net.eval()
    assert torch.allclose(compiled(x), eager_net(x), rtol=1e-5, atol=1e-5)
