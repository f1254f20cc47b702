"""crvae_ext: Lipschitz layers, fused kernels and certified-robust VAEs for PyTorch."""

from . import functional, ops
from ._backend import backends
from ._version import __version__
from .bounds import export, lipschitz_bound, register_bound
from .modules import GroupSort, LipLinear, MaxMin

__all__ = [
    "GroupSort",
    "LipLinear",
    "MaxMin",
    "__version__",
    "backends",
    "export",
    "functional",
    "lipschitz_bound",
    "ops",
    "register_bound",
]
