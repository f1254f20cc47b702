"""crvae_ext: Lipschitz layers, fused kernels and certified-robust VAEs for PyTorch."""

from . import conv_bounds, functional, ops
from ._backend import backends
from ._version import __version__
from .bounds import export, lipschitz_bound, register_bound
from .certify import (
    CertifyResult,
    RobustnessTarget,
    a_priori_radius,
    certified_radius,
    certify,
    design,
    robustness_probability,
)
from .modules import (
    GroupSort,
    L2BallProjection,
    LipConv2d,
    LipConvTranspose2d,
    LipLinear,
    MaxMin,
)
from .vae import ConvLipschitzVAE, LipschitzVAE, StandardVAE

__all__ = [
    "CertifyResult",
    "ConvLipschitzVAE",
    "GroupSort",
    "L2BallProjection",
    "LipConv2d",
    "LipConvTranspose2d",
    "LipLinear",
    "LipschitzVAE",
    "MaxMin",
    "RobustnessTarget",
    "StandardVAE",
    "__version__",
    "a_priori_radius",
    "backends",
    "certified_radius",
    "certify",
    "conv_bounds",
    "design",
    "export",
    "functional",
    "lipschitz_bound",
    "ops",
    "register_bound",
    "robustness_probability",
]
