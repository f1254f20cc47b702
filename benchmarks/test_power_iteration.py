"""power_iteration per usable backend vs two torch matvecs per iteration (baseline
``torch_matvec``: u = W v / |W v|, v = W^T u / |W^T u|, the loop any power iteration needs).

One step of the fused backends reads W once; the baseline reads it twice.
"""

from __future__ import annotations

import pytest
import torch

import crvae_ext
import crvae_ext.functional as F

SIZES = [1024, 4096]
ITERS = [1, 10]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _kinds(device: str) -> list[str]:
    usable = [b for b in crvae_ext.backends(device) if not (device == "cpu" and b == "triton")]
    return ["torch_matvec", *(f"power_iteration_{b}" for b in usable)]


CASES = [
    pytest.param(device, n, iters, kind, id=f"{device}-{n}x{n}-iters{iters}-{kind}")
    for device in DEVICES
    for n in SIZES
    for iters in ITERS
    for kind in _kinds(device)
]


def torch_matvec(weight: torch.Tensor, v: torch.Tensor, n_iters: int):
    """Two matvecs (and the two normalisations) per iteration."""
    for _ in range(n_iters):
        t = torch.mv(weight, v)
        u = t / t.norm()
        s = torch.mv(weight.t(), u)
        sigma = s.norm()
        v = s / sigma
    return sigma, u, v


@pytest.mark.parametrize(("device", "n", "iters", "kind"), CASES)
def test_power_iteration(benchmark, device, n, iters, kind):
    torch.manual_seed(0)
    weight = torch.randn(n, n, device=device)
    v = torch.randn(n, device=device)
    v /= v.norm()
    if kind == "torch_matvec":
        run = torch_matvec
    else:
        backend = kind.removeprefix("power_iteration_")

        def run(w, v, n_iters):
            return F.power_iteration(w, v, n_iters, backend=backend)

    def step():
        out = run(weight, v, iters)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"power_iteration {device} {n}x{n} fp32 n_iters={iters}"
    rounds = 100 if n * n * iters <= 1 << 22 else 10
    sigma, _, _ = benchmark.pedantic(step, rounds=rounds, warmup_rounds=2, iterations=1)
    assert torch.isfinite(sigma)
