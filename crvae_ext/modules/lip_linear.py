"""LipLinear: a drop-in nn.Linear whose l2 Lipschitz constant is a chosen k."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from .. import _backend, _checks, _state, _torch_private, bounds, ops
from .. import functional as F
from ._scaled import SIGMA_FLOOR, ScaledToK, _refresh

METHODS = ("spectral", "bjorck")
# The eval state runs the power iteration until sigma_hat moves by less than this (relative)
# over _CHECK_EVERY steps, at most _MAX_STEPS steps.
_TOLERANCE = 1e-7
_CHECK_EVERY = 10
_MAX_STEPS = 2000


class LipLinear(ScaledToK):
    """y = W_eff x + b with |W_eff|_2 = ``lipschitz`` (k), for any k > 0.

    method="spectral": W_eff = (k / sigma_hat) W, sigma_hat from a persistent power iteration
    that advances ``n_power_iterations`` steps per training forward; the backward is analytic
    (one GEMM like nn.Linear plus a rank-1 term), with no normalised copy of W.
    method="bjorck": W_eff = k * Bjorck(W / sigma_hat), orthonormal, gradient-norm preserving.
    Eval mode converges sigma_hat once per weight state and caches it.
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
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.n_power_iterations = _checks.integer("n_power_iterations", n_power_iterations, 1)
        self.bjorck_iterations = _checks.integer("bjorck_iterations", bjorck_iterations, 1)
        self.backend = _backend.check_name(backend)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("u", torch.empty(out_features, **factory))
        self.register_buffer("v", torch.empty(in_features, **factory))
        self.lipschitz = lipschitz
        self._cache: tuple | None = None
        self._bjorck_cache: tuple | None = None
        self.reset_parameters()

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
        """Orthogonal weight (all singular values equal), nn.Linear's bias, converged sigma_hat.

        On the meta device (no values) nothing is initialised: materialise with ``to_empty``,
        then call this again.
        """
        if self.weight.is_meta:
            return
        with torch.no_grad():
            self.weight.copy_(
                nn.init.orthogonal_(torch.empty_like(self.weight, dtype=torch.float32))
            )
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)
            self.v.normal_()
            self.v.div_(self.v.norm().clamp_min(SIGMA_FLOOR))
        self.converge_()

    @torch.no_grad()
    def converge_(
        self, tol: float = _TOLERANCE, max_iters: int = _MAX_STEPS, check_every: int = _CHECK_EVERY
    ) -> LipLinear:
        """Advance the power iteration until sigma_hat changes by < ``tol`` (relative) over
        ``check_every`` steps; the buffers keep the result. A zero or non-finite state vector is
        re-seeded first."""
        if not bool(torch.isfinite(self.v).all()) or float(self.v.norm()) == 0:
            self.v.normal_()
        self._store(*self._converged(self.v, tol, max_iters, check_every))
        return self

    def _converged(
        self,
        start: torch.Tensor,
        tol: float = _TOLERANCE,
        max_iters: int = _MAX_STEPS,
        check_every: int = _CHECK_EVERY,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sigma, u, v) of the power iteration from ``start`` run to ``tol``; the buffers are
        left as they are. One step on the meta device (no values to test)."""
        sigma, u, v = F.power_iteration(self.weight, start, 1, self.backend)
        if self.weight.is_meta:
            return sigma, u, v
        previous = float(sigma)
        for _ in range(0, max_iters, check_every):
            sigma, u, v = F.power_iteration(self.weight, v, check_every, self.backend)
            current = float(sigma)
            if abs(current - previous) <= tol * abs(current):
                break
            previous = current
        return sigma, u, v

    def _iterate(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One training forward's power-iteration steps; the buffers advance in place, except
        under torch.func transforms, which need a pure function (the step is still used)."""
        with torch.no_grad():
            sigma, u, v = F.power_iteration(
                self.weight, self.v, self.n_power_iterations, self.backend
            )
            if not _torch_private.functorch_active():
                self._store(sigma, u, v)
        return self._scale(sigma), u, v

    def _eval_key(self) -> tuple:
        """What the eval state depends on: W, u, v as PyTorch tracks them (``_state``), k and
        the Björck steps."""
        return (
            _state.tensor_key(self.weight),
            _state.tensor_key(self.u),
            _state.tensor_key(self.v),
            self._lipschitz,
            self.bjorck_iterations,
        )

    def _converged_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale, u, v): the power iteration from the buffer v, which stays as it is, run to
        convergence. sigma_hat = u^T W v holds for the pair and is >= 0 whatever W did."""
        with torch.no_grad(), torch.inference_mode(False):
            sigma, u, v = self._converged(self.v)
            return self._scale(sigma), u, v

    def _eval_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale, u, v) of the eval forward. Eagerly refreshed when the key moves, into the same
        tensors, in place: a compiled graph reads those tensors, so it applies exactly the map
        every refresh (``eval()``, an eager eval forward, ``lipschitz_bound``) certifies. Under
        torch.func the state is computed afresh (the weight may be a transform's)."""
        if _torch_private.functorch_active():
            return self._converged_state()
        if torch.compiler.is_compiling():
            if self._cache is None:
                raise RuntimeError(
                    "LipLinear: an eval-mode layer is compiled before its eval state exists; "
                    "call .eval() on it (or run it once in eval mode) before torch.compile"
                )
            return self._cache[1:]
        key = self._eval_key()
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, *_refresh(self._cache, self._converged_state()))
        return self._cache[1:]

    def train(self, mode: bool = True) -> LipLinear:
        """As nn.Module.train; switching to eval also refreshes the eval state (and the Björck
        weight), so that a later torch.compile of the eval forward finds it current."""
        super().train(mode)
        if not mode and _backend.plain_eager() and not self.weight.is_meta:
            scale = self._eval_state()[0]
            if self.method == "bjorck":
                self._bjorck_cached(scale)
        return self

    def normalization(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale, u, v) of the eval-mode forward: y = scale * x W^T + b, scale = k / (u^T W v)."""
        return self._eval_state()

    def invalidate_cache(self) -> None:
        """Mark the eval state stale (its tensors stay, for compiled graphs that read them);
        needed only after editing ``weight.data`` in place, which no version counter sees
        (``lipschitz_bound`` always does this first)."""
        if self._cache is not None:
            self._cache = (None, *self._cache[1:])
        if self._bjorck_cache is not None:
            self._bjorck_cache = (None, *self._bjorck_cache[1:])

    def _bjorck(self, scale: torch.Tensor) -> torch.Tensor:
        w = self.weight * (scale / self._lipschitz).to(self.weight.dtype)
        return F.bjorck(w, self.bjorck_iterations) * self._lipschitz

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.method == "spectral":
            fused = self._fused_training_forward(x)
            if fused is not None:
                return fused
        F.check_linear_input(x, self.weight)  # before the buffers advance
        state = self._iterate() if self.training else self._eval_state()
        if self.method == "spectral":
            return F.lip_linear(x, self.weight, self.bias, *state, self._lipschitz, self.backend)
        return nn.functional.linear(x, self._bjorck_weight(state[0]), self.bias)

    def _fused_training_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The training forward as one call of the backend's ``lip_linear_train`` (the cpp
        backend's, in C++: ``_iterate``'s steps then ``F.lip_linear``'s op, without their
        per-call Python and small ops), for plain CPU tensors in plain eager mode; None elsewhere,
        and wherever the Python path would raise (it then says why)."""
        if type(x) is not torch.Tensor or not x.is_cpu or _torch_private.tracing():
            return None  # compile, functorch and dispatch modes trace the Python path
        state = self._fusable()
        if state is None or _torch_private.functorch_active():
            return None
        kernel = ops.eager_entry("lip_linear_train", _backend.resolve(self.backend, x.device))
        if kernel is None:
            return None
        if x.dim() != 2:
            F.check_linear_input(x, state[0])
            flat = x.reshape(-1, self.in_features)
        else:
            flat = x
        try:  # the kernel checks the arguments (or returns None) before the buffers advance
            out = kernel(flat, *state, self.n_power_iterations, self._lipschitz, SIGMA_FLOOR)
        except (TypeError, ValueError):
            return None
        if out is None or x.dim() == 2:
            return out
        return out.reshape(*x.shape[:-1], self.out_features)

    def _fusable(self) -> tuple[torch.Tensor, ...] | None:
        """(weight, bias, u, v) when the layer's own state fits the one-call forward: plain
        tensors, a valid step count, ``_iterate``/``_store``/``_scale`` not overridden; the
        kernel checks their shapes, dtypes and devices."""
        n = self.n_power_iterations
        if type(n) is not int or n < 1 or not _python_steps_kept(type(self)):
            return None
        if not _PYTHON_STEPS.keys().isdisjoint(self.__dict__.keys()):  # views: 3 lookups
            return None
        params, buffers = self.__dict__["_parameters"], self.__dict__["_buffers"]
        w, b, u, v = params.get("weight"), params.get("bias"), buffers.get("u"), buffers.get("v")
        if type(w) not in _PLAIN or type(u) not in _PLAIN or type(v) not in _PLAIN:
            return None  # also tensor subclasses: the Python path
        return None if b is not None and type(b) not in _PLAIN else (w, b, u, v)

    def _bjorck_weight(self, scale: torch.Tensor) -> torch.Tensor:
        """Björck weight: differentiable when gradients reach the weight, else cached in eval."""
        uncached = _torch_private.functorch_active()
        if self.training or uncached or (torch.is_grad_enabled() and self.weight.requires_grad):
            return self._bjorck(scale)
        return self._bjorck_cached(scale)

    @torch.no_grad()
    def _bjorck_cached(self, scale: torch.Tensor) -> torch.Tensor:
        """The eval Björck weight, refreshed in place like the eval state (the same tensor under
        torch.compile)."""
        if torch.compiler.is_compiling():
            if self._bjorck_cache is None:
                raise RuntimeError(
                    "LipLinear: call .eval() on a Björck layer before compiling its eval forward"
                )
            return self._bjorck_cache[1]
        key = self._eval_key()
        if self._bjorck_cache is None or self._bjorck_cache[0] != key:
            with torch.inference_mode(False):
                fresh = (self._bjorck(scale),)
            self._bjorck_cache = (key, *_refresh(self._bjorck_cache, fresh))
        return self._bjorck_cache[1]

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The weight the eval-mode forward applies, rounded to the layer's dtype (detached;
        the same cached tensors): what ``to_linear`` exports."""
        scale = self._eval_state()[0]
        if self.method == "spectral":
            return (self.weight.detach().to(scale.dtype) * scale).to(self.weight.dtype)
        return self._bjorck_cached(scale)

    def lipschitz_bound(self) -> float:
        """Exact upper bound on the Lipschitz constant of the eval-mode forward AND of its
        export ``to_linear()``, from the weights (float64; derivation in the README).

        The eval state is refreshed first, so the bound and every later eval forward describe
        the same, current weights (even after an in-place ``weight.data`` edit).
        """
        self.invalidate_cache()
        with torch.no_grad():
            if self.method == "spectral":
                _checks.finite_tensor("LipLinear.weight", self.weight)
                return bounds.scaled_norm_bound(
                    self.weight, self._eval_state()[0], self.effective_weight(), "LipLinear"
                )
            return bounds.spectral_norm_bound(
                self.effective_weight(), "LipLinear's Björck weight (try converge_())"
            )

    @torch.no_grad()
    def exact_map(self) -> torch.Tensor:
        """The eval-mode map as a float64 matrix: s W (exact for fp32 and narrower weights),
        or the Björck weight the forward applies."""
        if self.method == "spectral":
            scale = self._eval_state()[0].detach().to("cpu", torch.float64)
            return self.weight.detach().to("cpu", torch.float64) * scale
        return self.effective_weight().to("cpu", torch.float64)

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

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "lipschitz": self._lipschitz,
            "method": self.method,
            "bjorck_iterations": self.bjorck_iterations,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.lipschitz = state["lipschitz"]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        extra = state_dict.get(prefix + "_extra_state")
        if isinstance(extra, dict):
            for name in ("method", "bjorck_iterations"):
                if name in extra and extra[name] != getattr(self, name):
                    error_msgs.append(
                        f"{prefix}{name}: the state dict was saved by a LipLinear with "
                        f"{name}={extra[name]!r}, this one has {name}={getattr(self, name)!r} "
                        "(the same weights give a different function); build the layer with "
                        f"{name}={extra[name]!r}"
                    )
                    return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "v" not in state_dict or prefix + "u" not in state_dict:
            self.converge_()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, lipschitz={self._lipschitz:g}, method={self.method!r}"
        )


_PLAIN = (nn.Parameter, torch.Tensor)  # types the one-call forward takes as they are

# The Python training steps the one-call forward stands for: overriding one keeps the Python path.
_PYTHON_STEPS = {
    "_iterate": LipLinear._iterate,
    "_store": ScaledToK._store,
    "_scale": ScaledToK._scale,
}


@functools.cache
def _python_steps_kept(cls: type) -> bool:
    """Whether class ``cls`` keeps LipLinear's Python training steps as they are."""
    return all(getattr(cls, name) is step for name, step in _PYTHON_STEPS.items())
