"""torch.compile(fullgraph=True) of LipLinear + GroupSort stacks: no graph break, same numbers."""

import pytest
import torch
from torch import nn

from crvae_ext import GroupSort, LipLinear, MaxMin

DEVICE = "cuda"


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
