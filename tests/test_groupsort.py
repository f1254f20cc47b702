"""GroupSort against an independent oracle: torch.sort on the grouped view, with its autograd."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import crvae_ext
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


BACKENDS = [b for b in crvae_ext.backends("cpu") if b != "triton_gemm"]


@pytest.mark.parametrize("path", ["functional", "public_op"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_size", [2, 3, 4])
def test_double_backward_gradgradcheck(backend, group_size, path):
    """Gradient penalties through GroupSort (WGAN-GP style): second derivatives on every backend
    against finite differences; the backward is a permutation, so d(grad_x)/d(grad) is one."""
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)

    def f(t):
        if path == "functional":
            return F.groupsort(t, group_size, 1, backend=backend)
        return crvae_ext.ops.groupsort(t, group_size, 1, backend)

    assert torch.autograd.gradgradcheck(lambda t: f(t) * torch.arange(12.0).double(), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_matches_the_sort_oracle(backend):
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64)
    penalties = []
    for f in (lambda t: F.groupsort(t, 4, 1, backend=backend), lambda t: sort_oracle(t, 4, 1)):
        (g,) = torch.autograd.grad((f(x).square() * w).sum(), x, create_graph=True)
        penalties.append(torch.autograd.grad(g.square().sum(), x)[0])
    torch.testing.assert_close(penalties[0], penalties[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functorch_jacrev_vmap_grad(backend):
    """torch.func transforms: the Jacobian is the sorting permutation, vmap equals a loop."""
    layer = GroupSort(4, dim=0, backend=backend)
    x = torch.randn(8, dtype=torch.float64)
    jacobian = torch.func.jacrev(layer)(x)
    assert torch.equal(jacobian, torch.func.jacrev(lambda t: sort_oracle(t, 4, 0))(x))
    assert torch.equal(jacobian @ x, sort_oracle(x, 4, 0))  # a permutation matrix
    batch = torch.randn(5, 8, dtype=torch.float64)
    assert torch.equal(torch.func.vmap(layer)(batch), torch.stack([layer(r) for r in batch]))
    weights = torch.randn(8, dtype=torch.float64)
    got = torch.func.grad(lambda t: (layer(t) * weights).sum())(x)
    want = torch.func.grad(lambda t: (sort_oracle(t, 4, 0) * weights).sum())(x)
    assert torch.equal(got, want)
    per_row = torch.func.vmap(torch.func.jacrev(layer))(batch)
    assert torch.equal(per_row[2], torch.func.jacrev(layer)(batch[2]))
