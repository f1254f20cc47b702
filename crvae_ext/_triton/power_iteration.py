"""Power-iteration kernels and launcher: one read of W per step, no host synchronisation.

One step is t = W v (v the current right vector, kept unnormalised between steps), then
s = W^T t = sum_i w_i (w_i . v), accumulated per row block while the block is on chip, so each
step reads W from memory once. Normalisation is folded in: u = t / |t|, s/|t| = W^T u,
sigma = |s| / |t|, v = s / (|t| sigma), the reference's formulas with its 1e-12 floors.

Small weights (whole W fits one program's registers) run every step in ONE launch of one
program. Larger ones take two launches per step: a persistent row-block kernel (one program
per SM, each writes its partial W^T t row; the block stays in registers when a full row fits,
else its second touch comes from L1/L2) and a column reduction of those partials in a fixed
order (deterministic, no atomics). A final kernel writes u, v and sigma. Accumulation is fp32
for fp16/bf16/fp32 weights, fp64 for fp64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _torch_private
from .._meta import accumulate_dtype
from . import _common

# Padded bytes of W in the accumulation dtype up to which every step runs in one program (W in
# registers: 16384 fp32 values over 8 warps; an fp64 tile of that many spills)
SMALL_WEIGHT_BYTES = 65536
PROGRAMS_PER_SM = 2  # persistent row-block programs per SM (latency hiding vs partials traffic)
ROW_TILE = 8192  # elements of the register tile in the row-block kernel
_ROW_WARPS = 8
_COL_BLOCK = 256  # columns per tile when a whole row does not fit the register tile
_REDUCE_BLOCK = 512  # columns per program in the partials reduction
_FINISH_BLOCK = 1024  # elements per program in the final normalisation


@triton.jit
def _power_iteration_small_kernel(w_ptr, v_ptr, sigma_ptr, u_ptr, v_out_ptr, m, n, s_wm, s_wn,
                                  n_iters, EPS: tl.constexpr, M: tl.constexpr,
                                  N: tl.constexpr):  # fmt: skip
    """Every step in one program, W held in registers: read once per launch."""
    acc = u_ptr.dtype.element_ty
    eps = tl.full([], EPS, acc)  # the floor exactly in the accumulation dtype
    rows = tl.arange(0, M)
    cols = tl.arange(0, N)
    mask = (rows[:, None] < m) & (cols[None, :] < n)
    offsets = rows[:, None].to(tl.int64) * s_wm + cols[None, :].to(tl.int64) * s_wn
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0)
    w = w.to(acc)
    v = tl.load(v_ptr + cols, mask=cols < n, other=0.0).to(acc)
    u = tl.zeros([M], acc)
    sigma = tl.sum(u, axis=0)
    for _ in range(n_iters):
        t = tl.sum(w * v[None, :], axis=1)
        u = t / tl.maximum(tl.sqrt(tl.sum(t * t, axis=0)), eps)
        s = tl.sum(w * u[:, None], axis=0)
        sigma = tl.sqrt(tl.sum(s * s, axis=0))
        v = s / tl.maximum(sigma, eps)
    tl.store(u_ptr + rows, u, mask=rows < m)
    tl.store(v_out_ptr + cols, v, mask=cols < n)
    tl.store(sigma_ptr, sigma)


@triton.jit
def _norm(sq_ptr, count, P: tl.constexpr):
    """sqrt of the sum of ``count`` partial squared norms (P >= count, a power of two)."""
    idx = tl.arange(0, P)
    return tl.sqrt(tl.sum(tl.load(sq_ptr + idx, mask=idx < count, other=0.0), axis=0))


@triton.jit
def _power_iteration_rows_kernel(w_ptr, v_ptr, vsq_ptr, n_vsq, t_ptr, tsq_ptr, part_ptr, m, n,
                                 s_wm, s_wn, EPS: tl.constexpr, BM: tl.constexpr,
                                 BN: tl.constexpr, WHOLE_ROW: tl.constexpr,
                                 NV: tl.constexpr):  # fmt: skip
    """Program p: row blocks p, p + P, ...: t = W_blk v, then its partial W_blk^T t.

    v is the previous step's unnormalised s, scaled by 1/|s| from its partial squared norms
    (``n_vsq`` of them; 0 on the first step: v as given). Writes t, this program's partial
    |t|^2 and its partial row of W^T t.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    acc = t_ptr.dtype.element_ty
    eps = tl.full([], EPS, acc)
    scale = tl.where(n_vsq > 0, 1.0 / tl.maximum(_norm(vsq_ptr, n_vsq, NV), eps), 1.0)
    part_row = part_ptr + pid.to(tl.int64) * n
    tsq = tl.zeros([BM], acc)
    if WHOLE_ROW:
        cols = tl.arange(0, BN)
        v = tl.load(v_ptr + cols, mask=cols < n, other=0.0).to(acc) * scale
        s = tl.zeros([BN], acc)
        for block in range(pid, tl.cdiv(tl.cast(m, tl.int64), BM), programs):
            rows = block * BM + tl.arange(0, BM)
            mask = (rows[:, None] < m) & (cols[None, :] < n)
            offsets = rows[:, None].to(tl.int64) * s_wm + cols[None, :].to(tl.int64) * s_wn
            w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(acc)
            t = tl.sum(w * v[None, :], axis=1)
            s += tl.sum(w * t[:, None], axis=0)
            tl.store(t_ptr + rows, t, mask=rows < m)
            tsq += t * t
        tl.store(part_row + cols, s, mask=cols < n)
    else:
        for start in range(0, n, BN):
            cols = start + tl.arange(0, BN)
            tl.store(part_row + cols, tl.zeros([BN], acc), mask=cols < n)
        # The partial row is read back by other threads of this program: barriers order the
        # global stores before those loads (a CTA barrier makes them visible to the block).
        tl.debug_barrier()
        for block in range(pid, tl.cdiv(tl.cast(m, tl.int64), BM), programs):
            rows = block * BM + tl.arange(0, BM)
            row_offsets = rows[:, None].to(tl.int64) * s_wm
            t = tl.zeros([BM], acc)
            for start in range(0, n, BN):
                cols = start + tl.arange(0, BN)
                mask = (rows[:, None] < m) & (cols[None, :] < n)
                col_offsets = cols[None, :].to(tl.int64) * s_wn
                w = tl.load(w_ptr + row_offsets + col_offsets, mask=mask, other=0.0)
                v = tl.load(v_ptr + cols, mask=cols < n, other=0.0).to(acc) * scale
                t += tl.sum(w.to(acc) * v[None, :], axis=1)
            for start in range(0, n, BN):
                cols = start + tl.arange(0, BN)
                mask = (rows[:, None] < m) & (cols[None, :] < n)
                col_offsets = cols[None, :].to(tl.int64) * s_wn
                w = tl.load(w_ptr + row_offsets + col_offsets, mask=mask, other=0.0)
                s = tl.load(part_row + cols, mask=cols < n, other=0.0)
                s += tl.sum(w.to(acc) * t[:, None], axis=0)
                tl.store(part_row + cols, s, mask=cols < n)
            tl.store(t_ptr + rows, t, mask=rows < m)
            tsq += t * t
            tl.debug_barrier()
    tl.store(tsq_ptr + pid, tl.sum(tsq, axis=0))


@triton.jit
def _power_iteration_reduce_kernel(part_ptr, n_parts, s_ptr, ssq_ptr, n, B: tl.constexpr):
    """s[cols] = sum over programs of the partial rows, in program order; partial |s|^2."""
    cols = tl.program_id(0) * B + tl.arange(0, B)
    mask = cols < n
    s = tl.zeros([B], s_ptr.dtype.element_ty)
    part = part_ptr + cols
    for _ in range(n_parts):
        s += tl.load(part, mask=mask, other=0.0)
        part += n  # a pointer step: p * n can pass 2^31
    tl.store(s_ptr + cols, s, mask=mask)
    tl.store(ssq_ptr + tl.program_id(0), tl.sum(s * s, axis=0))


@triton.jit
def _power_iteration_finish_kernel(t_ptr, tsq_ptr, n_tsq, s_ptr, ssq_ptr, n_ssq, sigma_ptr, u_ptr,
                                   v_ptr, m, n, EPS: tl.constexpr, B: tl.constexpr,
                                   NT: tl.constexpr, NS: tl.constexpr):  # fmt: skip
    """u = t / |t|, sigma = |s| / |t|, v = (s / |t|) / sigma, with the reference's floors."""
    eps = tl.full([], EPS, s_ptr.dtype.element_ty)
    t_den = tl.maximum(_norm(tsq_ptr, n_tsq, NT), eps)
    sigma = _norm(ssq_ptr, n_ssq, NS) / t_den
    idx = tl.program_id(0) * B + tl.arange(0, B)
    tl.store(u_ptr + idx, tl.load(t_ptr + idx, mask=idx < m) / t_den, mask=idx < m)
    s = tl.load(s_ptr + idx, mask=idx < n) / t_den
    tl.store(v_ptr + idx, s / tl.maximum(sigma, eps), mask=idx < n)
    if tl.program_id(0) == 0:
        tl.store(sigma_ptr, sigma)


def _small(weight, v, n_iters, outputs) -> None:
    sigma, u, v_out = outputs
    m, n = (int(size) for size in weight.shape)
    big_m, big_n = triton.next_power_of_2(m), triton.next_power_of_2(n)
    _common.launch(_power_iteration_small_kernel, (1,))(
        weight, v, sigma, u, v_out, m, n, weight.stride(0), weight.stride(1), n_iters,
        EPS=_common.EPS, M=big_m, N=big_n, num_warps=_ROW_WARPS,
    )  # fmt: skip


def _large(weight, v, n_iters, outputs) -> None:
    sigma, u, v_out = outputs
    m, n = (int(size) for size in weight.shape)
    acc, device = u.dtype, u.device
    whole_row = triton.next_power_of_2(n) <= ROW_TILE
    bn = triton.next_power_of_2(n) if whole_row else _COL_BLOCK
    bm = max(1, ROW_TILE // bn)
    programs = min(PROGRAMS_PER_SM * _common.persistent_programs(device), triton.cdiv(m, bm))
    n_ssq = triton.cdiv(n, _REDUCE_BLOCK)
    t = torch.empty(m, dtype=acc, device=device)
    tsq = torch.empty(programs, dtype=acc, device=device)
    parts = torch.empty(programs, n, dtype=acc, device=device)
    s = torch.empty(n, dtype=acc, device=device)
    ssq = torch.empty(n_ssq, dtype=acc, device=device)
    nv, nt = triton.next_power_of_2(n_ssq), triton.next_power_of_2(programs)
    for step in range(n_iters):
        source = v if step == 0 else s
        _common.launch(_power_iteration_rows_kernel, (programs,))(
            weight, source, ssq, 0 if step == 0 else n_ssq, t, tsq, parts, m, n,
            weight.stride(0), weight.stride(1), EPS=_common.EPS, BM=bm, BN=bn,
            WHOLE_ROW=whole_row, NV=nv, num_warps=_ROW_WARPS,
        )  # fmt: skip
        _common.launch(_power_iteration_reduce_kernel, (n_ssq,))(
            parts, programs, s, ssq, n, B=_REDUCE_BLOCK
        )
    _common.launch(_power_iteration_finish_kernel, (triton.cdiv(max(m, n), _FINISH_BLOCK),))(
        t, tsq, programs, s, ssq, n_ssq, sigma, u, v_out, m, n, EPS=_common.EPS,
        B=_FINISH_BLOCK, NT=nt, NS=nv,
    )  # fmt: skip


def power_iteration(
    weight: torch.Tensor, v: torch.Tensor, n_iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n_iters`` steps of u = W v/|W v|, v = W^T u/|W^T u|; returns (sigma, u, v)."""
    _common.require_device(weight)
    m, n = (int(size) for size in weight.shape)  # block sizes are compile-time constants
    acc = accumulate_dtype(weight.dtype)
    if n_iters <= 0:  # no step: the reference's zero sigma and u, v as given
        return weight.new_zeros((), dtype=acc), weight.new_zeros(m, dtype=acc), v.to(acc, copy=True)
    if weight.numel() == 0:  # W v and W^T u are zero vectors: the reference's floors give 0
        zeros = weight.new_zeros
        return zeros((), dtype=acc), zeros(m, dtype=acc), zeros(n, dtype=acc)
    sigma = torch.empty((), dtype=acc, device=weight.device)
    u = torch.empty(m, dtype=acc, device=weight.device)
    v_out = torch.empty(n, dtype=acc, device=weight.device)
    padded = triton.next_power_of_2(m) * triton.next_power_of_2(n)
    small = padded * acc.itemsize <= SMALL_WEIGHT_BYTES
    path = _small if small else _large
    with _torch_private.direct_triton_launches(weight, v):
        path(weight.detach(), v.detach().contiguous(), n_iters, (sigma, u, v_out))
    return sigma, u, v_out
