"""LipConv2d and LipConvTranspose2d: drop-in convolutions whose l2 operator norm is a chosen k.

The norm is that of the convolution ITSELF on the layer's input size (fixed at the first
forward or by ``input_size=``), not of the reshaped kernel matrix: the power iteration runs on
the operator (a batch-1 convolution and its adjoint per step) and ``lipschitz_bound()`` is the
sound FFT bound of ``crvae_ext.conv_bounds``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .. import _checks, _lip_conv, _state, _torch_private, conv_bounds
from .. import functional as F
from .._meta import accumulate_dtype
from ._scaled import ScaledToK, _refresh

_LANCZOS_STEPS = 32
_FIRST_LANCZOS_STEPS = 8
_MAX_RESTARTS = 50


class _LipConv(ScaledToK):
    """Shared behaviour; subclasses set ``transposed`` and the weight layout."""

    transposed = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        lipschitz: float = 1.0,
        n_power_iterations: int = 1,
        input_size: int | tuple[int, int] | None = None,
        output_padding: int | tuple[int, int] = 0,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = _checks.integer("in_channels", in_channels, 1)
        self.out_channels = _checks.integer("out_channels", out_channels, 1)
        if self.transposed and padding_mode != "zeros":
            raise ValueError(f"{type(self).__name__} supports padding_mode='zeros' only")
        self.geometry = conv_bounds.ConvGeometry.of(
            kernel_size, stride, padding, dilation, padding_mode
        )
        self.output_padding = conv_bounds.as_pair("output_padding", output_padding, 0)
        if any(o >= s for o, s in zip(self.output_padding, self.geometry.stride, strict=True)):
            raise ValueError(
                f"output_padding={self.output_padding} must be smaller than the stride "
                f"{self.geometry.stride}"
            )
        if backend not in (None, "torch"):
            raise ValueError(
                f"{type(self).__name__} runs on PyTorch's convolution kernels: backend must be "
                f"None or 'torch', got {backend!r}"
            )
        self.backend = backend
        self.n_power_iterations = _checks.integer("n_power_iterations", n_power_iterations, 1)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        factory = {"device": device, "dtype": dtype}
        shape = (in_channels, out_channels) if self.transposed else (out_channels, in_channels)
        self.weight = nn.Parameter(torch.empty(*shape, *self.geometry.kernel_size, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("u", torch.empty(0, **factory))
        self.register_buffer("v", torch.empty(0, **factory))
        self.lipschitz = lipschitz
        self._cache: tuple | None = None
        self.reset_parameters()
        if input_size is not None:
            self.set_input_size(input_size)

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(H, W) the layer is normalised and bounded for; None before the first forward."""
        return tuple(self.v.shape[2:]) if self.v.dim() == 4 else None

    def output_size(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """Spatial output size for ``input_size``, as nn.Conv2d / nn.ConvTranspose2d give it."""
        g = self.geometry
        if not self.transposed:
            return g.output_size(input_size)
        return tuple(  # type: ignore[return-value]
            (n - 1) * s - 2 * p + d * (k - 1) + 1 + o
            for n, k, s, p, d, o in zip(
                input_size,
                g.kernel_size,
                g.stride,
                g.padding,
                g.dilation,
                self.output_padding,
                strict=True,
            )
        )

    def _bounded_size(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """The input size of the conv2d whose operator norm is the layer's: the input itself,
        or for a transposed layer its output (conv_transpose2d is conv2d's adjoint there)."""
        return self.output_size(input_size) if self.transposed else input_size

    @torch.no_grad()
    def set_input_size(self, input_size: int | tuple[int, int]) -> _LipConv:
        """Fix the input size (H, W) the layer is normalised and bounded for: new power-iteration
        state, converged. Inputs of other sizes are refused (smaller ones accepted with zero
        padding: the operator is then a restriction of this one)."""
        size = conv_bounds.as_pair("input_size", input_size, 1)
        if self.transposed and min(self.output_size(size)) < 1:
            raise ValueError(f"input_size={size} gives an empty output")
        self.geometry.check_input_size(self._bounded_size(size))
        channels = self.in_channels
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.v = torch.randn(1, channels, *size, **factory)
        self.u = torch.zeros(1, self.out_channels, *self.output_size(size), **factory)
        self._cache = None
        if not self.weight.is_meta:
            self.v.div_(torch.linalg.vector_norm(self.v))
            self.converge_()
        return self

    def reset_parameters(self) -> None:
        """nn.Conv2d's initialisation (the scale is irrelevant: the layer normalises it)."""
        if self.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * math.prod(self.geometry.kernel_size)
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        if self.input_size is not None:
            self.converge_()

    def _spec(self) -> _lip_conv.ConvSpec:
        g = self.geometry
        padding = (0, 0) if g.padding_mode == "circular" else g.padding
        return _lip_conv.ConvSpec(
            g.stride, padding, g.dilation, self.transposed, self.output_padding
        )

    def _pad(self) -> _lip_conv.CircularPad | None:
        circular = self.geometry.padding_mode == "circular"
        return _lip_conv.CircularPad(self.geometry.padding) if circular else None

    def _power(self, v: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        return _lip_conv.power_iteration(self.weight, v, self._spec(), n, self._pad())

    def _converged(
        self, start: torch.Tensor, tol: float | None = None, max_restarts: int = _MAX_RESTARTS
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sigma, u, v): restarted Lanczos from ``start``, each restart closed by one power step
        (so sigma = <u, A v> holds for the pair), until sigma moves by < ``tol`` (relative;
        default a few units of the accumulation dtype's rounding). The buffers stay as they are.
        """
        acc = accumulate_dtype(self.weight.dtype)
        tol = 8 * torch.finfo(acc).eps if tol is None else tol
        sigma, u, v = self._power(start, 1)
        for restart in range(max_restarts):
            previous = float(sigma)
            # a short first restart: from a converged state (a refresh) it already settles
            steps = _FIRST_LANCZOS_STEPS if restart == 0 else _LANCZOS_STEPS
            ritz = _lip_conv.lanczos(self.weight, v, self._spec(), steps, self._pad())
            sigma, u, v = self._power(ritz, 1)
            if abs(float(sigma) - previous) <= tol * abs(float(sigma)):
                break
        return sigma, u, v

    @torch.no_grad()
    def converge_(self, tol: float | None = None) -> _LipConv:
        """Converge the power-iteration state (``_converged``); the buffers keep the result (a
        zero or non-finite state is re-seeded first). Needs the input size."""
        self._need_size("converge_")
        if not bool(torch.isfinite(self.v).all()) or float(self.v.norm()) == 0:
            self.v.normal_()
        self._store(*self._converged(self.v, tol))
        return self

    def _need_size(self, what: str) -> None:
        if self.input_size is None:
            raise ValueError(
                f"{type(self).__name__}.{what}: the input size is not known yet; run a forward "
                "or build the layer with input_size=(H, W)"
            )

    def _iterate(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            sigma, u, v = self._power(self.v, self.n_power_iterations)
            if not _torch_private.functorch_active():
                self._store(sigma, u, v)
        return self._scale(sigma), u, v

    def _eval_key(self) -> tuple:
        return (
            _state.tensor_key(self.weight),
            _state.tensor_key(self.v),
            self._lipschitz,
        )

    def _eval_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale, u, v) of the eval forward: the converged power iteration from the buffer v,
        once per weight state, refreshed in place (compiled graphs read the same tensors)."""
        if torch.compiler.is_compiling():
            if self._cache is None:
                raise RuntimeError(
                    f"{type(self).__name__}: call .eval() on the layer (or run it once in eval "
                    "mode) before torch.compile of its eval forward"
                )
            return self._cache[1:]
        key = self._eval_key()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad(), torch.inference_mode(False):
                sigma, u, v = self._converged(self.v)
                fresh = (self._scale(sigma), u, v)
            self._cache = (key, *_refresh(self._cache, fresh))
        return self._cache[1:]

    def train(self, mode: bool = True) -> _LipConv:
        """As nn.Module.train; switching to eval refreshes the eval state (for torch.compile)."""
        super().train(mode)
        if not mode and self.input_size is not None and not self.weight.is_meta:
            self._eval_state()
        return self

    def invalidate_cache(self) -> None:
        """Mark the eval state stale: needed only after editing ``weight.data`` in place."""
        if self._cache is not None:
            self._cache = (None, *self._cache[1:])

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        _checks.float_tensor("x", x)
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"x must have shape (N, {self.in_channels}, H, W) or ({self.in_channels}, H, W),"
                f" got {tuple(x.shape)}"
            )
        if x.dtype != self.weight.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the weight has {self.weight.dtype}")
        size = tuple(x.shape[-2:])
        if self.input_size is None:
            self.set_input_size(size)
        elif size != self.input_size:
            smaller = all(a <= b for a, b in zip(size, self.input_size, strict=True))
            if not (smaller and self.geometry.padding_mode == "zeros"):
                raise ValueError(
                    f"{type(self).__name__} is normalised and bounded for {self.input_size} "
                    f"inputs (its input_size), got {size}; with zero padding, inputs up to that "
                    "size are covered; build the layer with the input_size you need"
                )
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x)
        scale, u, v = self._iterate() if self.training else self._eval_state()
        pad = self._pad()
        if pad is not None:
            x, v = pad(x), pad(v)
        return F.lip_conv2d(x, self.weight, self.bias, scale, u, v, self._lipschitz, self._spec())

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The kernel the eval forward applies, s K rounded to the layer's dtype (detached)."""
        self._need_size("effective_weight")
        scale = self._eval_state()[0]
        return _lip_conv.scaled_kernel(self.weight.detach(), scale)

    def lipschitz_bound(self, method: str = "svd") -> float:
        """A sound upper bound on the operator norm of the eval forward AND of ``to_plain()``
        on ``input_size`` inputs: the FFT bound of s K (exact in float64) plus the rounding of
        the exported kernel, sum_t |E_t - P_t|_F. ``method`` "svd" or "gram" (conv_bounds)."""
        self._need_size("lipschitz_bound")
        self.invalidate_cache()
        with torch.no_grad():
            _checks.finite_tensor(f"{type(self).__name__}.weight", self.weight)
            scale = self._eval_state()[0].detach().to("cpu", torch.float64)
            exact = self.weight.detach().to("cpu", torch.float64) * scale
            exported = self.effective_weight().to("cpu", torch.float64)
            gap = conv_bounds.kernel_difference_bound(exported - exact)
            if torch.float64 in (self.weight.dtype, scale.dtype):
                gap += torch.finfo(torch.float64).eps * conv_bounds.kernel_difference_bound(exact)
            # a transposed layer's weight is the kernel of its adjoint conv2d
            size = self._bounded_size(self.input_size)
            main = conv_bounds.conv_operator_bound(exact, size, self.geometry, method)
            return (main + gap) * (1 + 4 * torch.finfo(torch.float64).eps)

    @torch.no_grad()
    def _filled(self, plain: nn.Module, kernel: torch.Tensor) -> nn.Module:
        """``plain`` (the torch layer of the same geometry) holding ``kernel`` and the bias."""
        plain.weight.copy_(kernel)
        if self.bias is not None:
            plain.bias.copy_(self.bias)
        return plain

    def get_extra_state(self) -> dict[str, Any]:
        return {"lipschitz": self._lipschitz}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.lipschitz = state["lipschitz"]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """Buffers u, v take the saved input size (a fresh layer's are empty)."""
        for name in ("u", "v"):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor) and saved.shape != getattr(self, name).shape:
                if saved.dim() == 4:
                    self.geometry.check_input_size(
                        self._bounded_size(tuple(state_dict[prefix + "v"].shape[2:]))
                    )
                factory = {"device": self.weight.device, "dtype": self.weight.dtype}
                setattr(self, name, torch.empty(saved.shape, **factory))
        self._cache = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        g = self.geometry
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={g.kernel_size}, "
            f"stride={g.stride}, padding={g.padding}"
        )
        if g.dilation != (1, 1):
            text += f", dilation={g.dilation}"
        if self.transposed and self.output_padding != (0, 0):
            text += f", output_padding={self.output_padding}"
        if g.padding_mode != "zeros":
            text += f", padding_mode={g.padding_mode!r}"
        return text + (
            f", bias={self.bias is not None}, lipschitz={self._lipschitz:g}, "
            f"input_size={self.input_size}"
        )


class LipConv2d(_LipConv):
    """nn.Conv2d whose operator norm (l2, on ``input_size`` inputs) is ``lipschitz`` (k).

    Training: the kernel is scaled by k / sigma_hat, sigma_hat from a persistent power iteration
    on the convolution operator (``n_power_iterations`` batch-1 conv + adjoint pairs per
    forward); the backward is analytic. Eval: sigma_hat converged once per weight state.
    ``padding_mode`` "zeros" or "circular"; groups are not supported.
    """

    @torch.no_grad()
    def to_conv(self) -> nn.Conv2d:
        """A plain nn.Conv2d computing the eval-mode output."""
        g = self.geometry
        w = self.effective_weight()
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, g.kernel_size, g.stride, g.padding, g.dilation,
            bias=self.bias is not None, padding_mode=g.padding_mode, device=w.device,
            dtype=w.dtype,
        )  # fmt: skip
        return self._filled(conv, w)

    to_plain = to_conv


class LipConvTranspose2d(_LipConv):
    """nn.ConvTranspose2d whose operator norm (on ``input_size`` inputs) is ``lipschitz``: the
    adjoint of a conv2d, with the same norm (bounded as that conv2d on this layer's output
    size). Zero padding; ``output_padding`` < stride."""

    transposed = True

    @torch.no_grad()
    def to_conv_transpose(self) -> nn.ConvTranspose2d:
        """A plain nn.ConvTranspose2d computing the eval-mode output."""
        g = self.geometry
        w = self.effective_weight()
        conv = nn.ConvTranspose2d(
            self.in_channels, self.out_channels, g.kernel_size, g.stride, g.padding,
            self.output_padding, bias=self.bias is not None, dilation=g.dilation,
            device=w.device, dtype=w.dtype,
        )  # fmt: skip
        return self._filled(conv, w)

    to_plain = to_conv_transpose
