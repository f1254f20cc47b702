"""torch.library.opcheck on every op (schema, fake tensor, autograd registration, AOT dispatch)."""

import pytest
import torch
from torch.library import opcheck

from crvae_ext import ops, reference


@pytest.mark.parametrize("shape_dim", [((6, 8), 1), ((3, 4, 5), 1), ((10, 3), 0)])
def test_groupsort_opcheck(shape_dim):
    shape, dim = shape_dim
    x = torch.randn(shape, requires_grad=True)
    opcheck(ops.groupsort, (x, 2, dim, "torch"))
    opcheck(ops.groupsort_backward, (torch.randn(shape), x.detach(), 2, dim, "torch"))


def test_power_iteration_opcheck():
    w = torch.randn(7, 5)
    opcheck(ops.power_iteration, (w, torch.randn(5), 3, "torch"))


@pytest.mark.parametrize("bias", [True, False])
def test_lip_linear_opcheck(bias):
    w = torch.randn(6, 4, requires_grad=True)
    x = torch.randn(5, 4, requires_grad=True)
    b = torch.randn(6, requires_grad=True) if bias else None
    sigma, u, v = reference.power_iteration(w, torch.randn(4), 20)
    opcheck(ops.lip_linear, (x, w, b, 1.0 / sigma, u, v, 1.0, "torch"))
