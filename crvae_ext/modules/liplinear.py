"""LipLinear: a drop-in nn.Linear whose l2 Lipschitz constant is a chosen k."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import _backend, _checks, bounds
from .. import functional as F

METHODS = ("spectral", "bjorck")
_SIGMA_FLOOR = 1e-12
_optimizer_steps = [0]


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Fused optimizers update weights without bumping their version: count steps instead."""
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class LipLinear(nn.Module):
    """y = W_eff x + b with |W_eff|_2 = ``lipschitz`` (k), for any k > 0.

    method="spectral": W_eff = (k / sigma_hat) W, sigma_hat from a persistent power iteration
    that advances ``n_power_iterations`` steps per training forward; the backward is analytic
    (one GEMM like nn.Linear plus a rank-1 term), with no normalised copy of W.
    method="bjorck": W_eff = k * Bjorck(W / sigma_hat), orthonormal, gradient-norm preserving.
    Eval mode reuses a cached sigma_hat (or W_eff) until the weight or the buffers change.
    ``lipschitz_bound()`` is an exact upper bound from the eval-mode W_eff, never an estimate.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        lipschitz: float = 1.0,
        method: str = "spectral",
        n_power_iterations: int = 1,
        bjorck_iterations: int = 20,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = _checks.integer("in_features", in_features, 1)
        self.out_features = _checks.integer("out_features", out_features, 1)
        self.lipschitz = lipschitz
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.n_power_iterations = _checks.integer("n_power_iterations", n_power_iterations, 1)
        self.bjorck_iterations = _checks.integer("bjorck_iterations", bjorck_iterations, 1)
        self.backend = _backend.check_name(backend)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("u", torch.empty(out_features, **factory))
        self.register_buffer("v", torch.empty(in_features, **factory))
        self._cache: tuple | None = None
        self._bjorck_cache: tuple | None = None
        self.reset_parameters()

    @property
    def lipschitz(self) -> float:
        """The Lipschitz constant k the layer is normalised to (saved in the state dict)."""
        return self._lipschitz

    @lipschitz.setter
    def lipschitz(self, value: float) -> None:
        self._lipschitz = _checks.positive_finite("lipschitz", value)

    @classmethod
    def from_linear(cls, linear: nn.Linear, lipschitz: float = 1.0, **kwargs: Any) -> LipLinear:
        """A LipLinear with ``linear``'s weight and bias, its power iteration converged."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            lipschitz=lipschitz,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            **kwargs,
        )
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer.converge_()

    def reset_parameters(self) -> None:
        """Orthogonal weight (all singular values equal), nn.Linear's bias, converged sigma_hat."""
        with torch.no_grad():
            self.weight.copy_(
                nn.init.orthogonal_(torch.empty_like(self.weight, dtype=torch.float32))
            )
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)
            self.v.normal_()
            self.v.div_(self.v.norm().clamp_min(_SIGMA_FLOOR))
        self.converge_()

    @torch.no_grad()
    def converge_(
        self, tol: float = 1e-7, max_iters: int = 2000, check_every: int = 10
    ) -> LipLinear:
        """Advance the power iteration until sigma_hat changes by < ``tol`` (relative).

        A zero or non-finite state vector is re-seeded first.
        """
        if not bool(torch.isfinite(self.v).all()) or float(self.v.norm()) == 0:
            self.v.normal_()
        previous = None
        for _ in range(0, max_iters, check_every):
            current = float(self._advance(check_every)[0])
            if previous is not None and abs(current - previous) <= tol * abs(current):
                break
            previous = current
        return self

    def _advance(self, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``steps`` power-iteration steps; the buffers advance in place unless W v = 0 (a zero
        weight), which would leave a zero state no later weight could recover from."""
        sigma, u, v = F.power_iteration(self.weight, self.v, steps, self.backend)
        moved = sigma > 0
        self.u.copy_(torch.where(moved, u, self.u))
        self.v.copy_(torch.where(moved, v, self.v))
        return sigma, u, v

    def _scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """k / sigma_hat as a 0-d tensor (fp32, fp64 for fp64): the exact factor applied."""
        return self._lipschitz / sigma.clamp_min(_SIGMA_FLOOR)

    def _iterate(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One training forward's power-iteration step; the buffers advance in place."""
        with torch.no_grad():
            sigma, u, v = self._advance(self.n_power_iterations)
        return self._scale(sigma), u, v

    def _eval_key(self) -> tuple:
        w = self.weight
        return (
            _optimizer_steps[0],
            w._version,
            w.data_ptr(),
            w.dtype,
            self.u._version,
            self.v._version,
            self.u.data_ptr(),
            self.v.data_ptr(),
            self._lipschitz,
            self.bjorck_iterations,
        )

    def _frozen(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale, u, v) for eval: one power-iteration step from the buffer v, which stays as it
        is. sigma_hat = u^T W v holds for the pair and is >= 0 whatever happened to W."""
        with torch.no_grad():
            sigma, u, v = F.power_iteration(self.weight, self.v, 1, self.backend)
        return self._scale(sigma), u, v

    def _eval_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            return self._frozen()
        key = self._eval_key()
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, *self._frozen())
        return self._cache[1:]

    def normalization(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale, u, v) of the eval-mode forward: y = scale * x W^T + b, scale = k / (u^T W v)."""
        return self._eval_state()

    def invalidate_cache(self) -> None:
        """Forget the eval-mode state; needed only after editing ``weight.data`` in place,
        which no version counter sees (``lipschitz_bound`` always does this first)."""
        self._cache = self._bjorck_cache = None

    def _bjorck(self, scale: torch.Tensor) -> torch.Tensor:
        w = self.weight * (scale / self._lipschitz).to(self.weight.dtype)
        return F.bjorck(w, self.bjorck_iterations) * self._lipschitz

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._iterate() if self.training else self._eval_state()
        if self.method == "spectral":
            return F.lip_linear(x, self.weight, self.bias, *state, self._lipschitz, self.backend)
        F.check_linear_input(x, self.weight)
        return nn.functional.linear(x, self._bjorck_weight(state[0]), self.bias)

    def _bjorck_weight(self, scale: torch.Tensor) -> torch.Tensor:
        """Björck weight: differentiable when gradients reach the weight, else cached in eval."""
        if self.training or (torch.is_grad_enabled() and self.weight.requires_grad):
            return self._bjorck(scale)
        return self._bjorck_cached(scale)

    @torch.no_grad()
    def _bjorck_cached(self, scale: torch.Tensor) -> torch.Tensor:
        key = self._eval_key()
        if self._bjorck_cache is None or self._bjorck_cache[0] != key:
            self._bjorck_cache = (key, self._bjorck(scale))
        return self._bjorck_cache[1]

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The weight the eval-mode forward applies (detached; the same cached tensors)."""
        scale = self._eval_state()[0]
        if self.method == "spectral":
            return (self.weight.detach().to(scale.dtype) * scale).to(self.weight.dtype)
        return self._bjorck_cached(scale)

    def lipschitz_bound(self) -> float:
        """Exact upper bound on the eval-mode Lipschitz constant, from the weights (float64).

        The eval state is refreshed first, so the bound and every later eval forward describe
        the same, current weights (even after an in-place ``weight.data`` edit).
        """
        self.invalidate_cache()
        with torch.no_grad():
            if self.method == "spectral":
                scale = float(self._eval_state()[0].double())
                return bounds.spectral_norm_bound(self.weight, "LipLinear.weight") * scale
            return bounds.spectral_norm_bound(
                self.effective_weight(), "LipLinear's Björck weight (try converge_())"
            )

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear computing the eval-mode output."""
        w = self.effective_weight()
        linear = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, w.device, w.dtype
        )
        linear.weight.copy_(w)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    to_plain = to_linear

    def get_extra_state(self) -> dict[str, float]:
        return {"lipschitz": self._lipschitz}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.lipschitz = state["lipschitz"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "v" not in state_dict or prefix + "u" not in state_dict:
            self.converge_()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, lipschitz={self._lipschitz:g}, method={self.method!r}"
        )
