"""LipLinear forward and backward: GEMMs plus fused Triton epilogues, no host synchronisation.

Forward y = scale * (x W^T) + b. Backward, with G the output gradient and s = scale:
grad_x = s G W, grad_b = 1^T G, grad_W = s G^T x - coef u v^T, coef = (s / k) <G, y - b>.

Two GEMM variants, the ``gemm`` argument (backend "triton" passes "cublas", backend
"triton_gemm" passes "triton"; the GPU check measures both):
- "cublas": torch.mm for every GEMM (cuBLAS, honours torch's TF32 setting), then ONE fused
  elementwise kernel each way: the forward epilogue (scale, bias) in place on x W^T; in the
  backward one pass over G (and y) writes g = s G and the partial column sums (and <G, y - b>
  sums), and the
  rank-1 term is subtracted from grad_W in place, coef summed on the device.
- "triton": Triton GEMMs with scale/bias/rank-1 fused into their epilogues (no extra pass over
  the output or grad_W); the backward's elementwise kernel then only reduces. fp32 takes it only
  when torch allows TF32 (``tf32_allowed``; tensor cores): an IEEE fp32 Triton
  GEMM runs on FMA units, spills and trails cuBLAS, so fp32 without TF32 and fp64 always take
  "cublas".
<G, y - b> is <grad_x, x> when grad_x is computed (y is then not needed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _torch_private
from .._meta import Grads, accumulate_dtype
from . import _common

GEMMS = ("cublas", "triton")
_TILE_ROWS, _TILE_COLS = 32, 128  # elementwise tiles
_DOT_CHUNK = 256  # partial dot products summed at a time
# Row splits of the backward reductions: fixed, so partial counts stay static under compile;
# the interpreter runs programs one by one, so it gets fewer.
_SPLITS = 4 if _common.INTERPRETED else 32


@triton.jit
def _lip_linear_epilogue_kernel(out_ptr, s_or, s_oc, scale_ptr, bias_ptr, n_rows, n_cols,
                                HAS_BIAS: tl.constexpr, FP64: tl.constexpr, BR: tl.constexpr,
                                BC: tl.constexpr):  # fmt: skip
    """out = scale * out + bias, in place on the GEMM output (fp32 arithmetic, fp64 for fp64)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offsets = rows[:, None].to(tl.int64) * s_or + cols[None, :].to(tl.int64) * s_oc
    acc_t = tl.float64 if FP64 else tl.float32  # never round an fp64 output through fp32
    acc = tl.load(out_ptr + offsets, mask=mask).to(acc_t)
    y = acc * tl.load(scale_ptr).to(acc_t)
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=cols < n_cols).to(acc_t)[None, :]
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lip_linear_grad_kernel(grad_ptr, s_gr, s_gc, out_ptr, bias_ptr, scale_ptr, g_ptr, colsum_ptr,
                            dot_ptr, n_rows, n_cols, rows_per_split, HAS_BIAS: tl.constexpr,
                            WRITE_G: tl.constexpr, NEED_DOT: tl.constexpr, BR: tl.constexpr,
                            BC: tl.constexpr):  # fmt: skip
    """One pass over G (any strides) and y: g = s G, partial column sums of G, partial
    <G, y - b>. Program (c, r) covers columns block c of rows [r, r + 1) * rows_per_split."""
    acc = colsum_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1).to(tl.int64)
    cols = pid_c * BC + tl.arange(0, BC)
    col_mask = cols < n_cols
    scale = tl.load(scale_ptr).to(acc)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(acc)
    colsum = tl.zeros([BC], acc)
    dot = tl.zeros([BC], acc)
    start = pid_r * rows_per_split
    for r0 in range(start, tl.minimum(start + rows_per_split, n_rows), BR):
        rows = r0 + tl.arange(0, BR)
        mask = (rows[:, None] < n_rows) & col_mask[None, :]
        r64 = rows[:, None].to(tl.int64)
        c64 = cols[None, :].to(tl.int64)
        grad = tl.load(grad_ptr + r64 * s_gr + c64 * s_gc, mask=mask, other=0.0)
        grad = grad.to(acc)
        if WRITE_G:
            g = (grad * scale).to(g_ptr.dtype.element_ty)
            tl.store(g_ptr + r64 * n_cols + cols[None, :], g, mask=mask)
        colsum += tl.sum(grad, axis=0)
        if NEED_DOT:
            y = tl.load(out_ptr + r64 * n_cols + cols[None, :], mask=mask, other=0.0).to(acc)
            if HAS_BIAS:
                y -= bias[None, :]
            dot += tl.sum(grad * y, axis=0)
    tl.store(colsum_ptr + pid_r * n_cols + cols, colsum, mask=col_mask)
    tl.store(dot_ptr + pid_r * tl.num_programs(0) + pid_c, tl.sum(dot, axis=0))


@triton.jit
def _coefficient(dot_ptr, n_dot, ratio_ptr, ND: tl.constexpr):
    """coef = (scale / k) * sum of the ``n_dot`` partial <G, y - b>, ND at a time; scale / k
    arrives as a tensor in the accumulation dtype (a float argument would be fp32 compiled)."""
    total = tl.zeros([ND], dot_ptr.dtype.element_ty)
    for start in range(0, n_dot, ND):
        idx = start + tl.arange(0, ND)
        total += tl.load(dot_ptr + idx, mask=idx < n_dot, other=0.0)
    return tl.sum(total, axis=0) * tl.load(ratio_ptr).to(total.dtype)


@triton.jit
def _lip_linear_rank1_kernel(gw_ptr, s_gm, s_gn, u_ptr, v_ptr, dot_ptr, n_dot, ratio_ptr, m, n,
                             BR: tl.constexpr, BC: tl.constexpr, ND: tl.constexpr):  # fmt: skip
    """grad_W -= coef u v^T in place, coef from the partial sums."""
    coef = _coefficient(dot_ptr, n_dot, ratio_ptr, ND)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows[:, None] < m) & (cols[None, :] < n)
    offsets = rows[:, None].to(tl.int64) * s_gm + cols[None, :].to(tl.int64) * s_gn
    u = tl.load(u_ptr + rows, mask=rows < m, other=0.0).to(coef.dtype)
    v = tl.load(v_ptr + cols, mask=cols < n, other=0.0).to(coef.dtype)
    gw = tl.load(gw_ptr + offsets, mask=mask).to(coef.dtype)
    gw -= (coef * u)[:, None] * v[None, :]
    tl.store(gw_ptr + offsets, gw.to(gw_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lip_linear_matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, scale_ptr,
                              bias_ptr, dot_ptr, n_dot, u_ptr, v_ptr, ratio_ptr,
                              HAS_BIAS: tl.constexpr, RANK1: tl.constexpr, ND: tl.constexpr,
                              PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                              BK: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    """C = scale * (A B) [+ bias over columns] [- coef u v^T], fp32 accumulation, C contiguous.

    Programs walk output tiles in groups of GROUP_M tile rows so neighbours share A and B in L2.
    """
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(tl.cast(M, tl.int64), BM)  # 64-bit: M + BM - 1 can pass 2^31
    tiles_n = tl.cdiv(tl.cast(N, tl.int64), BN)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % group_rows
    tile_n = (pid % per_group) // group_rows
    rows = tile_m * BM + tl.arange(0, BM)
    cols = tile_n * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    k64 = ks.to(tl.int64)  # addresses in 64 bits: index * stride can pass 2^31
    a_step = BK * tl.cast(s_ak, tl.int64)
    b_step = BK * tl.cast(s_bk, tl.int64)
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * s_am + k64[None, :] * s_ak
    b_ptrs = b_ptr + k64[:, None] * s_bk + cols[None, :].to(tl.int64) * s_bn
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptrs, mask=(rows[:, None] < M) & (k0 + ks[None, :] < K), other=0.0)
        b = tl.load(b_ptrs, mask=(k0 + ks[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += a_step
        b_ptrs += b_step
    out = acc * tl.load(scale_ptr).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if RANK1:
        coef = _coefficient(dot_ptr, n_dot, ratio_ptr, ND).to(tl.float32)
        u = tl.load(u_ptr + rows, mask=rows < M, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        out -= (coef * u)[:, None] * v[None, :]
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(c_ptr + offsets, out.to(c_ptr.dtype.element_ty), mask=mask)


_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    # No spills and shared memory within sm_80's and sm_90's limits for fp32 (TF32), fp16 and
    # bf16 on the operands it is given (``python -m benchmarks.ptxas --full``); 128x128x32 at
    # 4 warps and 128x256x64 spill, the latter also overflows shared memory in fp32.
    for bm, bn, bk, w, s in [
        (128, 128, 64, 8, 3),
        (64, 128, 32, 4, 4),
        (64, 64, 32, 4, 4),
        (128, 64, 32, 4, 4),
    ]
]
_INTERPRETER_CONFIG = {"BM": 16, "BN": 16, "BK": 16, "GROUP_M": 2}
_matmul_tuned = triton.autotune(_CONFIGS, key=["M", "N", "K", "HAS_BIAS", "RANK1", "PRECISION"])(
    _lip_linear_matmul_kernel
)


def _matmul(a, b, out, scale, *, bias=None, rank1=None) -> torch.Tensor:
    """out = scale * (a b) [+ bias] [- coef u v^T] with rank1 = (dots, u, v, scale / k)."""
    (m, k), n = a.shape, b.shape[1]
    dots, u, v, ratio = rank1 if rank1 is not None else (scale, scale, scale, scale)
    precision = "tf32"  # fp32 arrives here only with TF32 allowed; no effect on half inputs
    args = (a, b, out, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), scale,
            bias if bias is not None else scale, dots, dots.numel(), u, v, ratio)  # fmt: skip
    flags = {"HAS_BIAS": bias is not None, "RANK1": rank1 is not None, "PRECISION": precision,
             "ND": _DOT_CHUNK}  # fmt: skip
    if _common.INTERPRETED:
        cfg = _INTERPRETER_CONFIG
        grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]),)
        _common.launch(_lip_linear_matmul_kernel, grid)(*args, **flags, **cfg)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
        _common.launch(_matmul_tuned, grid)(*args, **flags)
    return out


def _gemm_variant(gemm: str, *operands: torch.Tensor) -> str:
    """The GEMM variant that runs: "triton" only where its GEMM has tensor cores (fp16, bf16,
    fp32 with TF32 allowed) and tiles that load as whole vectors: every size a multiple of 16,
    each operand with a unit stride and the other a multiple of 16 (an odd shape or an expanded,
    stride-0 gradient makes its tiles spill). Anything else takes "cublas"."""
    if gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
    dtype = operands[0].dtype
    if gemm == "cublas" or dtype == torch.float64:
        return "cublas"
    if dtype == torch.float32 and not tf32_allowed():
        return "cublas"
    return gemm if all(_vector_tiles(t) for t in operands) else "cublas"


def tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls use TF32: the new API (``fp32_precision``) where it is
    set (torch refuses to read the legacy flag then), else ``allow_tf32``."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    return precision == "tf32" if precision != "none" else bool(matmul.allow_tf32)


def _vector_tiles(t: torch.Tensor) -> bool:
    """A 2-D operand whose tiles the Triton GEMM loads as aligned vectors (see _gemm_variant):
    sizes and the non-unit stride multiples of 16 (an expanded, stride-0 operand is not one),
    the data 16-byte aligned."""
    sizes, strides = t.shape, t.stride()
    return (
        all(n % 16 == 0 for n in sizes)
        and 1 in strides
        and all(s > 0 and s % 16 == 0 for s in strides if s != 1)
        and t.data_ptr() % 16 == 0
    )


def _epilogue(out: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    rows, cols = out.shape
    grid = (triton.cdiv(rows, _TILE_ROWS), triton.cdiv(cols, _TILE_COLS))
    _common.launch(_lip_linear_epilogue_kernel, grid)(
        out, out.stride(0), out.stride(1), scale, bias if bias is not None else scale, rows, cols,
        HAS_BIAS=bias is not None, FP64=out.dtype == torch.float64, BR=_TILE_ROWS, BC=_TILE_COLS,
    )  # fmt: skip


def lip_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    gemm: str = "cublas",
) -> torch.Tensor:
    """y = scale * (x W^T) + b for a 2-D ``x``; scale is a device 0-d tensor (never read here)."""
    _common.require_device(x)
    with _torch_private.direct_triton_launches(x, weight, bias, scale):
        if _gemm_variant(gemm, x, weight) == "triton":
            out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
            return _matmul(x, weight.t(), out, scale, bias=bias)
        out = torch.mm(x, weight.t())
        _epilogue(out, scale, bias)
        return out


def _reductions(grad, out, bias, scale, write_g: bool, need_dot: bool):
    """The backward's one elementwise pass: (g or None, per-split column sums, partial dots)."""
    rows, cols = grad.shape
    acc = accumulate_dtype(grad.dtype)
    splits = _SPLITS
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), _TILE_ROWS) * _TILE_ROWS
    col_blocks = triton.cdiv(cols, _TILE_COLS)
    g = torch.empty(rows, cols, dtype=grad.dtype, device=grad.device) if write_g else None
    colsum = torch.empty(splits, cols, dtype=acc, device=grad.device)
    dots = torch.empty(splits * col_blocks, dtype=acc, device=grad.device)
    _common.launch(_lip_linear_grad_kernel, (col_blocks, splits))(
        grad, grad.stride(0), grad.stride(1), out if out is not None else grad,
        bias if bias is not None else scale, scale,
        g if g is not None else colsum, colsum, dots, rows, cols, rows_per_split,
        HAS_BIAS=bias is not None, WRITE_G=write_g, NEED_DOT=need_dot,
        BR=_TILE_ROWS, BC=_TILE_COLS,
    )  # fmt: skip
    return g, colsum, dots


def _rank1(grad_w, u, v, dots, ratio) -> None:
    m, n = grad_w.shape
    grid = (triton.cdiv(m, _TILE_ROWS), triton.cdiv(n, _TILE_COLS))
    _common.launch(_lip_linear_rank1_kernel, grid)(
        grad_w, grad_w.stride(0), grad_w.stride(1), u, v, dots, dots.numel(), ratio, m, n,
        BR=_TILE_ROWS, BC=_TILE_COLS, ND=_DOT_CHUNK,
    )  # fmt: skip


def lip_linear_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None,
    scale: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    lipschitz: float,
    needs: tuple[bool, bool, bool] | list[bool],
    gemm: str = "cublas",
) -> Grads:
    """Gradients of y = k x W^T / (u^T W v) + b w.r.t. (x, W, b), u and v held constant;
    ``out`` (y) may be None when x needs a gradient."""
    _common.require_device(x)
    need_x, need_w, _ = needs
    if need_w and out is None and not need_x:
        raise ValueError("lip_linear_backward: out is required when x needs no gradient")
    with _torch_private.direct_triton_launches(grad, x, weight, bias, out, scale, u, v):
        ratio = scale.to(accumulate_dtype(grad.dtype)) / lipschitz  # as the reference divides
        fused = _gemm_variant(gemm, grad, x, weight) == "triton"
        return _backward(grad, x, weight, bias, out, scale, u, v, ratio, needs, fused)


def _backward(grad, x, weight, bias, out, scale, u, v, ratio, needs, fused):
    need_x, need_w, need_b = needs
    has_bias = bias is not None
    if not (need_x or need_w or (need_b and has_bias)):
        return None, None, None
    from_y = need_w and not need_x  # <G, y - b> from y; else from <grad_x, x>
    g, colsum, dots = _reductions(
        grad, out, bias, scale, write_g=not fused and (need_x or need_w), need_dot=from_y
    )
    grad_b = colsum.sum(0).to(bias.dtype) if has_bias and need_b else None
    grad_x = grad_w = None
    if need_x:
        if fused:
            grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
            _matmul(grad, weight, grad_x, scale)
        else:
            grad_x = torch.mm(g, weight)
        if need_w:
            acc = dots.dtype
            dots = torch.vdot(grad_x.reshape(-1).to(acc), x.reshape(-1).to(acc)).reshape(1)
    if need_w:
        if fused:
            grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format)
            _matmul(grad.t(), x, grad_w, scale, rank1=(dots, u, v, ratio))
        else:
            grad_w = torch.mm(g.t(), x)
            _rank1(grad_w, u, v, dots, ratio)
    return grad_x, grad_w, grad_b
