"""Bad input is a clear error that names the argument."""

import pytest
import torch

import crvae_ext.functional as F
from crvae_ext import GroupSort, LipLinear


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"group_size": 0}, ValueError, "group_size must be >= 1"),
        ({"group_size": 2.5}, TypeError, "group_size must be an integer"),
        ({"group_size": True}, TypeError, "group_size must be an integer"),
        ({"dim": "1"}, TypeError, "dim must be an integer"),
        ({"backend": "cuda"}, ValueError, "backend must be None, 'auto' or one of"),
    ],
)
def test_groupsort_constructor(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        GroupSort(**kwargs)


def test_groupsort_call_errors():
    with pytest.raises(ValueError, match="group_size=3 does not divide size 8 of dim 1"):
        F.groupsort(torch.randn(2, 8), 3)
    with pytest.raises(ValueError, match="dim=2 is out of range"):
        F.groupsort(torch.randn(2, 8), 2, dim=2)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        F.groupsort(torch.arange(8).reshape(2, 4), 2)
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor"):
        F.groupsort([1.0, 2.0], 2)
    with pytest.raises(ValueError, match="at least one dimension"):
        F.groupsort(torch.tensor(1.0), 1)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"lipschitz": 0.0}, ValueError, "lipschitz must be a finite number > 0"),
        ({"lipschitz": -1.0}, ValueError, "lipschitz must be a finite number > 0"),
        ({"lipschitz": float("nan")}, ValueError, "lipschitz must be a finite number > 0"),
        ({"lipschitz": float("inf")}, ValueError, "lipschitz must be a finite number > 0"),
        ({"lipschitz": "2"}, TypeError, "lipschitz must be a real number"),
        ({"n_power_iterations": 0}, ValueError, "n_power_iterations must be >= 1"),
        ({"bjorck_iterations": 0}, ValueError, "bjorck_iterations must be >= 1"),
        ({"method": "ortho"}, ValueError, "method must be one of"),
        ({"in_features": 0}, ValueError, "in_features must be >= 1"),
        ({"backend": "gpu"}, ValueError, "backend must be None"),
    ],
)
def test_liplinear_constructor(kwargs, exc, match):
    args = {"in_features": 4, "out_features": 3, **kwargs}
    with pytest.raises(exc, match=match):
        LipLinear(**args)


def test_lipschitz_setter_validates():
    layer = LipLinear(4, 3)
    with pytest.raises(ValueError, match="lipschitz must be a finite number > 0"):
        layer.lipschitz = -2.0
    assert layer.lipschitz == 1.0


@pytest.mark.parametrize("method", ["spectral", "bjorck"])
def test_liplinear_input_errors(method):
    layer = LipLinear(4, 3, method=method)
    with pytest.raises(ValueError, match="last dimension in_features=4, got shape \\(2, 5\\)"):
        layer(torch.randn(2, 5))
    with pytest.raises(TypeError, match=r"floating-point tensor, got dtype torch.int64"):
        layer(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(
        TypeError, match=r"x has dtype torch.float64 but weight has dtype torch.float32"
    ):
        layer(torch.randn(2, 4, dtype=torch.float64))


def test_power_iteration_errors():
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match="n_iters must be >= 1"):
        F.power_iteration(w, torch.randn(4), 0)
    with pytest.raises(ValueError, match=r"v must have shape \(4,\)"):
        F.power_iteration(w, torch.randn(3), 1)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        F.power_iteration(torch.randn(3), torch.randn(3), 1)


def test_lip_linear_scale_must_not_require_grad():
    w = torch.randn(3, 4)
    scale = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(ValueError, match="scale must be a 0-d tensor that does not require grad"):
        F.lip_linear(torch.randn(2, 4), w, None, scale, torch.randn(3), torch.randn(4), 1.0)


def test_lip_linear_argument_dtypes_and_devices():
    x, w, u, v = torch.randn(2, 4), torch.randn(3, 4), torch.randn(3), torch.randn(4)
    with pytest.raises(TypeError, match="scale must be a floating-point tensor"):
        F.lip_linear(x, w, None, torch.tensor(2), u, v, 1.0)
    with pytest.raises(TypeError, match="u must be a floating-point tensor"):
        F.lip_linear(x, w, None, torch.tensor(2.0), u.long(), v, 1.0)
    meta = torch.empty(3, device="meta")
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        F.lip_linear(x, w, meta, torch.tensor(2.0), u, v, 1.0)
    with pytest.raises(ValueError, match="v is on meta but x is on cpu"):
        F.lip_linear(x, w, None, torch.tensor(2.0), u, v.to("meta"), 1.0)
