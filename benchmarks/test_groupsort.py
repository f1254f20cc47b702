"""GroupSort(2) forward + backward per usable backend vs torch.sort on the grouped view vs ReLU.

ReLU moves the same bytes, so it is the floor (baseline id ``relu``); ``torch_sort`` is what a
plain-PyTorch GroupSort costs. Triton joins on a GPU (its CPU mode is an interpreter).
"""

from __future__ import annotations

import pytest
import torch

import crvae_ext
import crvae_ext.functional as F

SHAPES = [(256, 1024), (1024, 4096)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _kinds(device: str) -> list[str]:
    usable = [b for b in crvae_ext.backends(device) if not (device == "cpu" and b == "triton")]
    return ["relu", "torch_sort", *(f"groupsort_{b}" for b in usable)]


CASES = [
    pytest.param(device, shape, kind, id=f"{device}-{shape[0]}x{shape[1]}-{kind}")
    for device in DEVICES
    for shape in SHAPES
    for kind in _kinds(device)
]


def _forward(kind: str):
    if kind == "relu":
        return torch.relu
    if kind == "torch_sort":
        return lambda x: x.unflatten(1, (-1, 2)).sort(dim=2).values.flatten(1, 2)
    backend = kind.removeprefix("groupsort_")
    return lambda x: F.groupsort(x, 2, 1, backend=backend)


@pytest.mark.parametrize(("device", "shape", "kind"), CASES)
def test_groupsort_fwd_bwd(benchmark, device, shape, kind):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, requires_grad=True)
    grad = torch.randn(shape, device=device)
    forward = _forward(kind)

    def step() -> torch.Tensor:
        (out,) = torch.autograd.grad(forward(x), x, grad)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"groupsort(2) fwd+bwd {device} {shape[0]}x{shape[1]} fp32"
    small = shape[0] * shape[1] <= 1 << 18
    rounds = (200 if small else 30) if kind != "torch_sort" else (30 if small else 5)
    result = benchmark.pedantic(step, rounds=rounds, warmup_rounds=2, iterations=1)
    assert result.shape == x.shape
