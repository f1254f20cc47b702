"""Triton kernels compiled for CUDA: every dtype against float64 oracles, full opcheck,
torch.compile(fullgraph=True) forward and backward, and a training run against the torch
backend. Skipped without CUDA (conftest); benchmarks/gpu_check.py runs this file.
"""

import pytest
import torch
from helpers import naive_lip_linear
from torch.library import opcheck

import crvae_ext.functional as F
from crvae_ext import GroupSort, LipLinear, MaxMin, ops, reference

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol) against a float64 oracle, per dtype; fp32 GEMMs may use TF32 only where torch
# is told to (allow_tf32 is off by default), so fp32 is held to fp32 accuracy.
TOLERANCE = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}
GROUP_SIZES = [2, 4, 8, 3, 5, 6, 16]


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> bool:
    rtol, atol = TOLERANCE[dtype]
    return torch.allclose(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize(
    ("shape", "dim"),
    [((64, 480), 1), ((8, 240, 7, 9), 1), ((4, 48, 300), 1), ((240, 33), 0)],
    ids=["rows", "nchw", "blocked-inner", "dim0"],
)
def test_groupsort_exact_in_every_dtype(shape, dim, group_size, dtype):
    x = torch.randint(-4, 5, shape, device=DEVICE).to(dtype)  # ties everywhere
    x.view(-1)[::7] = float("nan")
    grad = torch.randn(shape, device=DEVICE).to(dtype)
    out = ops.groupsort(x, group_size, dim, "triton")
    want = reference.groupsort(x, group_size, dim)
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out.nan_to_num(), want.nan_to_num())
    got = ops.groupsort_backward(grad, x, group_size, dim, "triton")
    assert torch.equal(got, reference.groupsort_backward(grad, x, group_size, dim))


@pytest.mark.parametrize("group_size", [2, 4, 8, 3])
def test_groupsort_strided_and_large(group_size):
    base = torch.randn(512, 4096 * 2, device=DEVICE)
    for x, dim in [(base[:, ::2], 1), (base.t(), 0), (base[:, :4096].t(), 1)]:
        if x.shape[dim] % group_size:
            continue
        assert torch.equal(ops.groupsort(x, group_size, dim, "triton"),
                           reference.groupsort(x, group_size, dim))  # fmt: skip
        grad = torch.randn(x.shape, device=DEVICE)
        assert torch.equal(ops.groupsort_backward(grad, x, group_size, dim, "triton"),
                           reference.groupsort_backward(grad, x, group_size, dim))  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(48, 40), (1000, 3000), (4096, 4096), (300, 20000)])
def test_power_iteration_every_dtype(shape, dtype):
    w = torch.randn(shape, device=DEVICE).to(dtype)
    v = torch.randn(shape[1], device=DEVICE)
    got = ops.power_iteration(w, v, 3, "triton")
    want = reference.power_iteration(w.double(), v.double(), 3)
    assert all(t.dtype == (torch.float32) for t in got)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-5)


def test_power_iteration_converges_to_svd():
    w = torch.randn(700, 300, dtype=torch.float64, device=DEVICE)
    exact = reference.spectral_norm_exact(w)
    sigma, _, _ = ops.power_iteration(w.float(), torch.randn(300, device=DEVICE), 3000, "triton")
    assert float(sigma) == pytest.approx(exact, rel=1e-4)


@pytest.fixture(params=["triton", "triton_gemm"])
def gemm(request):
    """The backend: cuBLAS GEMMs + Triton epilogues, or Triton GEMMs with fused epilogues."""
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(256, 1024, 1024), (37, 100, 300), (1, 64, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_lip_linear_every_dtype(gemm, shape, dtype, bias):
    batch, n, m = shape
    w = torch.randn(m, n, device=DEVICE) / n**0.5
    sigma, u, v = reference.power_iteration(w, torch.randn(n, device=DEVICE), 30)
    k = 1.5
    x = torch.randn(batch, n, device=DEVICE)
    b = torch.randn(m, device=DEVICE) if bias else None
    leaves = [t.to(dtype).requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
    out = F.lip_linear(leaves[0], leaves[1], leaves[2] if bias else None, k / sigma, u, v, k,
                       backend=gemm)  # fmt: skip
    grad = torch.randn_like(out)
    out.backward(grad)
    exact = [t.detach().double().requires_grad_(True) for t in leaves]
    naive = naive_lip_linear(exact[0], exact[1], exact[2] if bias else None, u.double(),
                             v.double(), k)  # fmt: skip
    naive.backward(grad.double())
    assert _close(out, naive, dtype)
    for got, want in zip(leaves, exact, strict=True):
        assert _close(got.grad, want.grad, dtype, scale=max(1.0, batch**0.5))


def test_opcheck_full_on_cuda():
    x = torch.randn(6, 12, 5, device=DEVICE, requires_grad=True)
    for g in (2, 3, 4):
        opcheck(ops.groupsort, (x, g, 1, "triton"))
        opcheck(ops.groupsort_backward, (torch.randn_like(x), x.detach(), g, 1, "triton"))
    opcheck(ops.power_iteration, (torch.randn(7, 5, device=DEVICE), torch.randn(5, device=DEVICE),
                                  3, "triton"))  # fmt: skip
    opcheck(ops.power_iteration, (torch.randn(300, 200, device=DEVICE),
                                  torch.randn(200, device=DEVICE), 2, "triton"))  # fmt: skip
    w = torch.randn(6, 4, device=DEVICE, requires_grad=True)
    sigma, u, v = reference.power_iteration(w, torch.randn(4, device=DEVICE), 20)
    for bias in (torch.randn(6, device=DEVICE, requires_grad=True), None):
        xx = torch.randn(5, 4, device=DEVICE, requires_grad=True)
        opcheck(ops.lip_linear, (xx, w, bias, 1.0 / sigma, u, v, 1.0, "triton"))


def _stack() -> torch.nn.Sequential:
    return torch.nn.Sequential(
        LipLinear(64, 128), GroupSort(4), LipLinear(128, 64, lipschitz=2.0), MaxMin(),
        LipLinear(64, 10),
    ).to(DEVICE)  # fmt: skip


def test_compile_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    compiled_net, eager_net = _stack(), _stack()
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


def test_cpu_tensors_are_delegated_on_a_gpu_machine():
    """Compiled kernels cannot read CPU memory: the same op runs the CPU backend instead."""
    x = torch.randn(4, 6)
    assert torch.equal(ops.groupsort(x, 3, 1, "triton"), reference.groupsort(x, 3, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_matches_torch_backend(dtype):
    losses = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            LipLinear(32, 64, lipschitz=2.0, backend=backend), GroupSort(4, backend=backend),
            LipLinear(64, 8, backend=backend),
        ).to(DEVICE, dtype)  # fmt: skip
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        x = torch.randn(128, 32, device=DEVICE, dtype=dtype)
        y = torch.randn(128, 8, device=DEVICE, dtype=dtype)
        losses[backend] = []
        for _ in range(30):
            loss = (net(x) - y).float().square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[backend].append(loss.item())
    rel = 1e-4 if dtype == torch.float32 else 5e-2
    assert losses["triton"] == pytest.approx(losses["torch"], rel=rel)
    assert losses["triton"][-1] < losses["triton"][0]
