"""The oracles themselves, checked against independent numpy computations."""

import numpy as np
import pytest
import torch

from crvae_ext import reference


def _numpy_groupsort(x: np.ndarray, group_size: int, dim: int) -> np.ndarray:
    moved = np.moveaxis(x, dim, -1)
    shape = moved.shape
    out = np.sort(moved.reshape(*shape[:-1], shape[-1] // group_size, group_size), axis=-1)
    return np.moveaxis(out.reshape(shape), -1, dim)


@pytest.mark.parametrize(
    ("shape", "group_size", "dim"), [((5, 12), 3, 1), ((4, 6, 3), 2, 1), ((8, 5), 8, 0)]
)
def test_groupsort_matches_numpy(shape, group_size, dim):
    x = torch.randn(shape, dtype=torch.float64)
    expected = _numpy_groupsort(x.numpy(), group_size, dim)
    np.testing.assert_array_equal(reference.groupsort(x, group_size, dim).numpy(), expected)


def test_groupsort_backward_is_the_adjoint():
    x = torch.randn(6, 12, dtype=torch.float64)
    g = torch.randn(6, 12, dtype=torch.float64)
    r = torch.randn(6, 12, dtype=torch.float64)
    # <g, J r> == <J^T g, r> with J the (locally linear) permutation.
    lhs = (
        g * reference.groupsort(x + 1e-9 * r, 4, 1).sub(reference.groupsort(x, 4, 1)) / 1e-9
    ).sum()
    rhs = (reference.groupsort_backward(g, x, 4, 1) * r).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-5)


@pytest.mark.parametrize("shape", [(40, 40), (60, 25), (25, 60)])
def test_power_iteration_converges_to_svd(shape):
    w = torch.randn(shape, dtype=torch.float64)
    v = torch.randn(shape[1], dtype=torch.float64)
    sigma, u, v = reference.power_iteration(w, v / v.norm(), 500)
    assert sigma.item() == pytest.approx(np.linalg.norm(w.numpy(), 2), rel=1e-8)
    assert torch.dot(u, w @ v).item() == pytest.approx(sigma.item(), rel=1e-12)


def test_spectral_norm_exact_matches_numpy():
    w = torch.randn(30, 17)
    assert reference.spectral_norm_exact(w) == pytest.approx(
        np.linalg.norm(w.double().numpy(), 2), rel=1e-14
    )
