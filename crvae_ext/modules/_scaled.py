"""What every layer normalised to a chosen Lipschitz constant k shares."""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks, _torch_private

SIGMA_FLOOR = 1e-12  # sigma_hat below it is taken as this (a zero weight gives a finite scale)


class ScaledToK(nn.Module):
    """A module with a ``weight`` scaled to the constant ``lipschitz`` (k), which must stay a
    normal number of the weight's dtype (beyond its range the output is inf or 0)."""

    weight: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    _lipschitz: float

    @property
    def lipschitz(self) -> float:
        """The constant k the layer is normalised to (saved in the state dict)."""
        return self._lipschitz

    @lipschitz.setter
    def lipschitz(self, value: float) -> None:
        value = _checks.positive_finite("lipschitz", value)
        _check_representable(value, self.weight.dtype)
        self._lipschitz = value

    def _store(self, sigma: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> None:
        """Copy a power-iteration result into the buffers, unless it came from a zero operator
        (A v = 0), which would leave a zero state no later weight could recover from."""
        if sigma.is_cpu and not _torch_private.tracing(sigma):  # a host value: no device sync
            if sigma.item() > 0:
                self.u.copy_(u)
                self.v.copy_(v)
            return
        moved = sigma > 0
        self.u.copy_(torch.where(moved, u, self.u))
        self.v.copy_(torch.where(moved, v, self.v))

    def _scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """k / sigma_hat as a 0-d tensor (fp32, fp64 for fp64): the exact factor applied."""
        return sigma.clamp_min(SIGMA_FLOOR).reciprocal().mul_(self._lipschitz)  # = k / sigma

    def _apply(self, fn, recurse: bool = True):
        """Refuse a dtype the constant k cannot be represented in, before converting."""
        target = fn(self.weight.detach().new_empty(0)).dtype
        _check_representable(self._lipschitz, target)
        return super()._apply(fn, recurse)


def _refresh(cached: tuple | None, fresh: tuple) -> tuple:
    """``fresh`` copied into the cached tensors in place where they fit (same shape, dtype and
    device), else the fresh tensors themselves."""
    old = cached[1:] if cached is not None else ()
    fits = len(old) == len(fresh) and all(
        (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)
        for a, b in zip(old, fresh, strict=True)
    )
    if not fits:
        return tuple(t.detach().clone() for t in fresh)
    with torch.no_grad(), torch.inference_mode(False):
        for a, b in zip(old, fresh, strict=True):
            if not torch.equal(a, b):  # an unchanged state bumps no version
                a.copy_(b)
    return old


def _check_representable(k: float, dtype: torch.dtype) -> None:
    """k must be a normal number of ``dtype``: beyond its range the output is inf or 0."""
    info = torch.finfo(dtype)
    if not info.tiny <= k <= info.max:
        raise ValueError(
            f"lipschitz={k:g} cannot be represented in {str(dtype).removeprefix('torch.')} "
            f"(normal numbers {info.tiny:.3g} .. {info.max:.3g}): choose k in that range "
            "or a wider dtype"
        )
