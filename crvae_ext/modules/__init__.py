"""Lipschitz layers: drop-in replacements for nn.Linear and activations."""

from .ball import L2BallProjection
from .groupsort import GroupSort, MaxMin
from .lip_conv import LipConv2d, LipConvTranspose2d
from .lip_linear import LipLinear

__all__ = [
    "GroupSort",
    "L2BallProjection",
    "LipConv2d",
    "LipConvTranspose2d",
    "LipLinear",
    "MaxMin",
]
