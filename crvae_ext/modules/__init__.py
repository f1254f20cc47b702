"""Lipschitz layers: drop-in replacements for nn.Linear and activations."""

from .groupsort import GroupSort, MaxMin
from .liplinear import LipLinear

__all__ = ["GroupSort", "LipLinear", "MaxMin"]
