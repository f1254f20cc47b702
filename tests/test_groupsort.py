"""GroupSort against an independent oracle: torch.sort on the grouped view, with its autograd."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import crvae_ext.functional as F
from crvae_ext import GroupSort, MaxMin


def sort_oracle(x: torch.Tensor, group_size: int, dim: int) -> torch.Tensor:
    """torch.sort on (..., groups, group_size, ...): differentiable by torch's own sort backward."""
    d = dim % x.dim()
    return x.unflatten(d, (-1, group_size)).sort(dim=d + 1).values.flatten(d, d + 1)


CASES = [
    ((8, 12), 2, 1),
    ((8, 12), 3, 1),
    ((8, 12), 4, -1),
    ((8, 12), 12, 1),  # full sort
    ((6, 8, 5), 8, 1),
    ((4, 6, 3, 5), 2, 1),  # N x C x H x W, groups along channels
    ((12, 5), 4, 0),
    ((3, 4, 10), 5, 2),
]


@pytest.mark.parametrize(("shape", "group_size", "dim"), CASES)
def test_forward_and_backward_match_oracle(shape, group_size, dim):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = F.groupsort(x, group_size, dim)
    expected = sort_oracle(x, group_size, dim)
    assert torch.equal(out, expected)
    grad_out = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, grad_out)
    (want,) = torch.autograd.grad(expected, x, grad_out)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("make", "dim"),
    [
        (lambda t: t.t(), 1),
        (lambda t: t[:, ::2], 1),
        (lambda t: t.reshape(4, 4, 48).permute(0, 2, 1), 1),  # channels-last style
    ],
    ids=["transposed", "strided", "permuted"],
)
def test_non_contiguous_input(make, dim):
    x = make(torch.randn(16, 48, dtype=torch.float64)).detach().requires_grad_(True)
    assert not x.is_contiguous()
    out = F.groupsort(x, 2, dim)
    assert torch.equal(out, sort_oracle(x.detach(), 2, dim))
    grad_out = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, grad_out)
    (want,) = torch.autograd.grad(sort_oracle(x, 2, dim), x, grad_out)
    assert torch.equal(got, want)


def test_gradcheck():
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: F.groupsort(t, 3, 1), (x,))


def test_modules():
    x = torch.randn(5, 8)
    assert torch.equal(MaxMin()(x), sort_oracle(x, 2, 1))
    assert torch.equal(GroupSort(4, dim=-1)(x), sort_oracle(x, 4, -1))
    assert torch.equal(GroupSort(1)(x), x)
    assert "group_size=4" in repr(GroupSort(4))


def test_ties_route_each_gradient_once():
    x = torch.tensor([[1.0, 1.0, 2.0, 2.0]], requires_grad=True)
    out = F.groupsort(x, 4, 1)
    (grad,) = torch.autograd.grad(out, x, torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert sorted(grad.flatten().tolist()) == [1.0, 2.0, 3.0, 4.0]


def test_empty_batch():
    x = torch.randn(0, 6)
    assert F.groupsort(x, 3, 1).shape == (0, 6)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 5),
    groups=st.integers(1, 6),
    group_size=st.sampled_from([2, 3, 4, 5, 8]),
    inner=st.integers(1, 3),
)
def test_property_matches_oracle(batch, groups, group_size, inner):
    x = torch.randn(batch, groups * group_size, inner, dtype=torch.float64)
    assert torch.equal(F.groupsort(x, group_size, 1), sort_oracle(x, group_size, 1))
