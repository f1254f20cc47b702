"""Sound upper bounds on the l2 operator norm of 2-D convolutions, from the kernel.

A convolution with stride s is rewritten as a stride-1 convolution of the input's s x s phases
(space-to-depth, an isometry); a zero-padded one is a crop of a circular convolution on a grid
large enough that nothing wraps; a circular convolution's singular values are those of the
per-frequency c_out x c_in matrices A(f) = sum_t K_t w^(f t) (Sedghi et al., ICLR 2019). So
|conv| <= max_f |A(f)|_2, exactly for circular padding with output size n / s. Derivation with
every step in the README ("Convolution bounds"). Float64, with the rounding bounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _checks, bounds

PADDING_MODES = ("zeros", "circular")
BOUND_METHODS = ("svd", "gram")
_F64 = torch.float64
_EPS = torch.finfo(_F64).eps
_U = _EPS / 2  # float64's unit roundoff


def _norm(t: torch.Tensor, dim=(-2, -1)) -> torch.Tensor:
    """The 2-norm over ``dim`` without underflow or overflow: scaled by the largest |entry|."""
    big = t.abs().amax(dim, keepdim=True)
    safe = torch.where(big > 0, big, torch.ones_like(big))
    return torch.linalg.vector_norm(t / safe, dim=dim) * safe.squeeze(dim)


def as_pair(name: str, value: int | tuple[int, int], minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= ``minimum``, as a pair."""
    values = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(values) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return tuple(_checks.integer(name, v, minimum) for v in values)  # type: ignore[return-value]


@dataclass(frozen=True)
class ConvGeometry:
    """What a 2-D convolution does to the positions of its input: the bound depends on it."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    padding_mode: str = "zeros"

    @classmethod
    def of(
        cls,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        padding_mode: str = "zeros",
    ) -> ConvGeometry:
        """Validated geometry from PyTorch-style arguments (ints or pairs)."""
        if padding_mode not in PADDING_MODES:
            raise ValueError(
                f"padding_mode must be one of {PADDING_MODES} (the modes the bound covers), "
                f"got {padding_mode!r}"
            )
        if isinstance(padding, str):
            raise ValueError(
                f"padding={padding!r}: give the padding as an int or a pair of ints "
                "(e.g. kernel_size // 2 for 'same' with stride 1 and odd kernels)"
            )
        return cls(
            as_pair("kernel_size", kernel_size, 1),
            as_pair("stride", stride, 1),
            as_pair("padding", padding, 0),
            as_pair("dilation", dilation, 1),
            padding_mode,
        )

    def output_size(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """The convolution's output size for ``input_size`` (H, W), as nn.Conv2d computes it."""
        return tuple(  # type: ignore[return-value]
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, k, s, p, d in zip(
                input_size, self.kernel_size, self.stride, self.padding, self.dilation, strict=True
            )
        )

    def check_input_size(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """``input_size`` as a pair if the bound covers this geometry on it; else a clear error."""
        size = as_pair("input_size", input_size, 1)
        out = self.output_size(size)
        if min(out) < 1:
            raise ValueError(
                f"input_size={size} is too small for kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, padding={self.padding}: the output would be empty"
            )
        for n, k, s, p, d, o in zip(
            size, self.kernel_size, self.stride, self.padding, self.dilation, out, strict=True
        ):
            if self.padding_mode == "zeros" and not any(
                0 <= s * i + j * d - p < n for i in range(o) for j in range(k)
            ):
                raise ValueError(
                    f"input_size={size}: every tap of every output reads the zero padding "
                    f"(kernel_size={self.kernel_size}, stride={self.stride}, padding="
                    f"{self.padding}, dilation={self.dilation}); the convolution is zero"
                )
        if self.padding_mode == "circular":
            for n, p, s, o in zip(size, self.padding, self.stride, out, strict=True):
                if p > n:
                    raise ValueError(
                        f"circular padding={self.padding} is larger than input_size={size}"
                    )
                if o > -(-n // s):
                    raise ValueError(
                        f"circular padding with output size {out} > input size / stride "
                        f"repeats rows of the circular operator, which the bound does not cover: "
                        f"use 2 * padding <= dilation * (kernel_size - 1) (got padding "
                        f"{self.padding}, kernel_size {self.kernel_size})"
                    )
        return size


@dataclass(frozen=True)
class _Axis:
    """One spatial axis of the phase-domain circular convolution: each kernel tap's phase and
    position, the grid size, and the number of phases kept."""

    phase: tuple[int, ...]
    position: tuple[int, ...]
    grid: int
    phases: int


def _axis(n: int, k: int, s: int, p: int, d: int, circular: bool) -> _Axis:
    """Tap j reads input position s i + o_j, o_j = j d - p = s q_j + r_j (0 <= r_j < s): phase
    r_j at phase position i + q_j. Zeros: a grid of N >= max(out + q_max, ceil(n / s)) -
    min(q_min, 0) points keeps every read position distinct from the input's support modulo N.
    Circular: exact on the n / s grid when s divides n; else the stride-1 circulant on n points
    (the output rows are a subset of its rows)."""
    out = (n + 2 * p - d * (k - 1) - 1) // s + 1
    offsets = [j * d - p for j in range(k)]
    if circular and n % s:
        s = 1
    phase = [o % s for o in offsets]
    q = [o // s for o in offsets]
    used = sorted(set(phase))
    compact = tuple(used.index(r) for r in phase)
    position = tuple(t - min(q) for t in q)
    grid = n // s if circular else max(out + max(q), -(-n // s)) - min(min(q), 0)
    return _Axis(compact, position, grid, len(used))


def phase_kernel(kernel: torch.Tensor, geometry: ConvGeometry, input_size: tuple[int, int]):
    """(K', grids): the float64 kernel of the equivalent stride-1 circular convolution, shape
    (c_out, c_in * P_h * P_w, L_h, L_w), and its grid (N_h, N_w)."""
    circular = geometry.padding_mode == "circular"
    h, w = (
        _axis(n, k, s, p, d, circular)
        for n, k, s, p, d in zip(
            input_size,
            geometry.kernel_size,
            geometry.stride,
            geometry.padding,
            geometry.dilation,
            strict=True,
        )
    )
    c_out, c_in = kernel.shape[:2]
    out = torch.zeros(
        c_out, c_in, h.phases, w.phases, max(h.position) + 1, max(w.position) + 1, dtype=_F64
    )
    k64 = kernel.detach().to("cpu", _F64)
    for i in range(geometry.kernel_size[0]):
        for j in range(geometry.kernel_size[1]):
            out[:, :, h.phase[i], w.phase[j], h.position[i], w.position[j]] += k64[:, :, i, j]
    return out.flatten(1, 3), (h.grid, w.grid)


def _twiddles(length: int, grid: int, half: bool) -> torch.Tensor:
    """exp(-2 pi i f t / N) for t < ``length`` and every frequency f (f <= N / 2 if ``half``:
    a real kernel's A(-f) is the conjugate of A(f), with the same singular values). The phase
    f t is reduced modulo N in integers first, to r in [-N/2, N/2]: the angle 2 pi r / N then
    has |angle| <= pi and an error below 3u pi, so each twiddle is within 17u (README)."""
    freqs = torch.arange(grid // 2 + 1 if half else grid, dtype=torch.int64)
    phase = torch.outer(freqs, torch.arange(length, dtype=torch.int64)) % grid
    phase = torch.where(2 * phase > grid, phase - grid, phase)
    angle = (-2 * math.pi / grid) * phase.to(_F64)
    return torch.polar(torch.ones_like(angle), angle)


def frequency_matrices(phased: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, float]:
    """(A, err): A(f) for every frequency (F x c_out x c_in', complex128) and a bound on
    max_f |fl(A(f)) - A(f)|_F. Each entry is a sum of L_h L_w terms K w_h w_w, computed in two
    passes: |error| <= gamma_n sum_t |K'_t| entrywise with n = 2 (L_h + L_w) + 64, which covers
    the twiddles' own error (<= 17u each, two passes), the complex products and both sums."""
    length_h, length_w = phased.shape[-2:]
    t_h = _twiddles(length_h, grid[0], half=False)
    t_w = _twiddles(length_w, grid[1], half=True)
    a = torch.einsum("oiht,gt->oihg", phased.to(torch.complex128), t_w)
    a = torch.einsum("oihg,fh->fgoi", a, t_h).flatten(0, 1)
    n = 2 * (length_h + length_w) + 64
    gamma = n * _U / (1 - n * _U)
    magnitude = float(_norm(phased.abs().sum((-2, -1))))
    summed = length_h * length_w + phased.shape[0] * phased.shape[1] + 4  # its own rounding
    return a, gamma * magnitude * (1 + summed * _EPS)


def _svd_bound(a: torch.Tensor) -> float:
    """max_f |A(f)|_2 by LAPACK, inflated for its rounding (``bounds.svd_margin``)."""
    return float(torch.linalg.matrix_norm(a, ord=2).max()) * bounds.svd_margin(*a.shape[-2:])


def gram_bound(a: torch.Tensor, iterations: int = 10) -> float:
    """max over the batch of a sound upper bound on |A|_2 by Gram iteration (Delattre et al.,
    ICML 2023): N_0 = A / r_0, N_(t+1) = fl(N_t^H N_t) / r_(t+1), r_t the computed |.|_F.

    With rounding (README): |A|_2 <= r_0 (x_0 + 2u), x_t^2 = r_(t+1) (x_(t+1) + 2u) +
    gamma_(2m+2) |N_t|_F^2 (the product's error; the division's is the 2u), x_T = |N_T|_F;
    evaluated backwards from T, rounding upwards. Matrix products only: fast where GEMMs are.
    """
    iterations = _checks.integer("iterations", iterations, 1)
    if a.shape[-2] < a.shape[-1]:
        a = a.mH
    up = 1 + 8 * _EPS
    tiny = torch.finfo(_F64).tiny

    def frobenius(t: torch.Tensor) -> torch.Tensor:
        return _norm(t) * (1 + (t.shape[-1] * t.shape[-2] + 4) * _EPS)

    r0 = _norm(a).clamp_min(tiny)
    n = a / r0[..., None, None]
    scales, errors = [], []
    for _ in range(iterations):
        m = n.shape[-2]
        gamma = (2 * m + 2) * _U / (1 - (2 * m + 2) * _U)
        errors.append(gamma * frobenius(n) ** 2 * up)
        h = n.mH @ n
        r = _norm(h).clamp_min(tiny)
        n = h / r[..., None, None]
        scales.append(r)
    x = frobenius(n)
    for r, e in zip(reversed(scales), reversed(errors), strict=True):
        x = torch.sqrt((r * (x + 2 * _U) * up + e) * up) * up
    return float((r0 * (x + 2 * _U) * up).max())


def conv_operator_bound(
    kernel: torch.Tensor,
    input_size: tuple[int, int],
    geometry: ConvGeometry,
    method: str = "svd",
    gram_iterations: int = 10,
) -> float:
    """A sound upper bound on the l2 operator norm of x -> conv2d(x, kernel) on inputs of
    ``input_size`` (H, W), for PyTorch's conv2d with ``geometry`` (no bias: a shift).

    method "svd": max over frequencies of the exact per-frequency spectral norm (the exact
    operator norm for circular padding whose output size is n / stride); "gram": the Gram
    iteration's bound on the same matrices, matrix products only.
    """
    _checks.float_tensor("kernel", kernel)
    if kernel.dim() != 4 or tuple(kernel.shape[2:]) != geometry.kernel_size:
        raise ValueError(
            f"kernel must have shape (out, in, {geometry.kernel_size[0]}, "
            f"{geometry.kernel_size[1]}), got {tuple(kernel.shape)}"
        )
    if method not in BOUND_METHODS:
        raise ValueError(f"method must be one of {BOUND_METHODS}, got {method!r}")
    _checks.finite_tensor("kernel", kernel)
    size = geometry.check_input_size(input_size)
    # exact power-of-two scaling into the normal range: the error model needs no underflow
    k64 = kernel.detach().to("cpu", _F64)
    exponent = int(torch.frexp(k64.abs().max()).exponent) if k64.numel() else 0
    scaled = torch.ldexp(k64, torch.tensor(-exponent))
    phased, grid = phase_kernel(scaled, geometry, size)
    a, err = frequency_matrices(phased, grid)
    err += phased.numel() * 2.0**-1074  # entries the scaling may have left subnormal
    main = _svd_bound(a) if method == "svd" else gram_bound(a, gram_iterations)
    value = (main + err) * (1 + 4 * _EPS)
    bound = math.ldexp(value, exponent)
    if math.ldexp(bound, -exponent) < value:  # a subnormal result rounded down: round up
        bound = math.nextafter(bound, math.inf)
    return bound


def kernel_difference_bound(difference: torch.Tensor) -> float:
    """An upper bound on the operator norm of a convolution with kernel ``difference`` for any
    geometry the bound covers: sum over taps of |D_t|_F (each tap is D_t applied to a selection
    of distinct input positions, a map of norm <= |D_t|_2 <= |D_t|_F)."""
    d = difference.detach().to("cpu", _F64)
    per_tap = _norm(d, dim=(0, 1))
    return float(per_tap.sum()) * (1 + (d.numel() + 4) * _EPS)
