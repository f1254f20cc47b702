"""GroupSort forward and backward kernels and their launchers.

The input is viewed as (outer, C, inner) with groups of ``G`` consecutive channels at stride
``inner``. Every path sorts by the strict total order (value, original index), NaN above
everything, so its permutation is exactly torch.sort(stable=True)'s and the backward routes
gradients the way the reference does, ties and signed zeros included.

Paths: register sorting networks for G = 2, 4, 8; a rank path for any other G (each element's
destination = number of group members ordered before it; O(G^2) compares, chunked so registers
stay bounded). Tiles are [B, G]: B groups, member j in column j. Inner == 1 (groups along the
last dim) gives contiguous, vectorised tiles; a large inner dim gets 2-D programs over one row
group's inner positions, so loads stay coalesced along it.
Strided inputs are read in place whenever the outer and inner dims each collapse to one stride.

The backward recomputes the order from x: it moves grad + x in and grad_x out, the same bytes
as ReLU's backward, and the op schema (grad, x) needs nothing saved beyond x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _torch_private
from . import _common

NETWORK_SIZES = (2, 4, 8)
BLOCKED_INNER = 256  # inner sizes from which programs take blocks of one row group's positions
_TILE = 2048  # elements per program (a power of two), at most _TILE_BYTES of them
_TILE_BYTES = 8192  # fp64 tiles of 2048 elements spill in the G = 8 network's backward
# The rank path keeps a rank per element beside the tile: smaller tiles (wider ones spill)
_RANK_TILE, _RANK_TILE_BYTES = 1024, 2048
_RANK_CHUNK = 64  # group members ranked at once in the rank path


@triton.jit
def _less(a, ia, b, ib):
    """(a, ia) < (b, ib): value order with NaN largest, ties broken by original index."""
    a_nan = a != a
    b_nan = b != b
    lt = (a < b) | (b_nan & ~a_nan)
    eq = (a == b) | (a_nan & b_nan)
    return lt | (eq & (ia < ib))


@triton.jit
def _cx(a, ia, b, ib):
    """Compare-exchange: the smaller (value, index) pair first."""
    swap = _less(b, ib, a, ia)
    return (
        tl.where(swap, b, a),
        tl.where(swap, ib, ia),
        tl.where(swap, a, b),
        tl.where(swap, ia, ib),
    )


@triton.jit
def _split4(t, B: tl.constexpr):
    """Columns 0..3 of a [B, 4] tile."""
    even, odd = tl.split(tl.reshape(t, (B, 2, 2)))
    c0, c2 = tl.split(even)
    c1, c3 = tl.split(odd)
    return c0, c1, c2, c3


@triton.jit
def _join4(c0, c1, c2, c3, B: tl.constexpr):
    """The [B, 4] tile with columns c0..c3."""
    return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (B, 4))


@triton.jit
def _split8(t, B: tl.constexpr):
    """Columns 0..7 of a [B, 8] tile."""
    even, odd = tl.split(tl.reshape(t, (B, 4, 2)))
    c0, c2, c4, c6 = _split4(even, B)
    c1, c3, c5, c7 = _split4(odd, B)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _join8(c0, c1, c2, c3, c4, c5, c6, c7, B: tl.constexpr):
    """The [B, 8] tile with columns c0..c7."""
    even = _join4(c0, c2, c4, c6, B)
    odd = _join4(c1, c3, c5, c7, B)
    return tl.reshape(tl.join(even, odd), (B, 8))


@triton.jit
def _network(t, B: tl.constexpr, G: tl.constexpr):
    """Sort each row of a [B, G] tile (G in 2, 4, 8): (sorted values, source columns) tiles."""
    if G == 2:
        a, b = tl.split(t)
        swap = (b < a) | ((a != a) & (b == b))  # (b, 1) < (a, 0): ties never swap
        values = tl.join(tl.where(swap, b, a), tl.where(swap, a, b))
        index = tl.join(swap.to(tl.int32), 1 - swap.to(tl.int32))
    elif G == 4:
        x0, x1, x2, x3 = _split4(t, B)
        i0 = tl.zeros([B], tl.int32)
        i1 = i0 + 1
        i2 = i0 + 2
        i3 = i0 + 3
        x0, i0, x1, i1 = _cx(x0, i0, x1, i1)
        x2, i2, x3, i3 = _cx(x2, i2, x3, i3)
        x0, i0, x2, i2 = _cx(x0, i0, x2, i2)
        x1, i1, x3, i3 = _cx(x1, i1, x3, i3)
        x1, i1, x2, i2 = _cx(x1, i1, x2, i2)
        values = _join4(x0, x1, x2, x3, B)
        index = _join4(i0, i1, i2, i3, B)
    else:
        x0, x1, x2, x3, x4, x5, x6, x7 = _split8(t, B)
        i0 = tl.zeros([B], tl.int32)
        i1 = i0 + 1
        i2 = i0 + 2
        i3 = i0 + 3
        i4 = i0 + 4
        i5 = i0 + 5
        i6 = i0 + 6
        i7 = i0 + 7
        # Batcher's odd-even merge sort for 8 inputs: 19 compare-exchanges, depth 6.
        x0, i0, x1, i1 = _cx(x0, i0, x1, i1)
        x2, i2, x3, i3 = _cx(x2, i2, x3, i3)
        x4, i4, x5, i5 = _cx(x4, i4, x5, i5)
        x6, i6, x7, i7 = _cx(x6, i6, x7, i7)
        x0, i0, x2, i2 = _cx(x0, i0, x2, i2)
        x1, i1, x3, i3 = _cx(x1, i1, x3, i3)
        x4, i4, x6, i6 = _cx(x4, i4, x6, i6)
        x5, i5, x7, i7 = _cx(x5, i5, x7, i7)
        x1, i1, x2, i2 = _cx(x1, i1, x2, i2)
        x5, i5, x6, i6 = _cx(x5, i5, x6, i6)
        x0, i0, x4, i4 = _cx(x0, i0, x4, i4)
        x1, i1, x5, i5 = _cx(x1, i1, x5, i5)
        x2, i2, x6, i6 = _cx(x2, i2, x6, i6)
        x3, i3, x7, i7 = _cx(x3, i3, x7, i7)
        x2, i2, x4, i4 = _cx(x2, i2, x4, i4)
        x3, i3, x5, i5 = _cx(x3, i3, x5, i5)
        x1, i1, x2, i2 = _cx(x1, i1, x2, i2)
        x3, i3, x4, i4 = _cx(x3, i3, x4, i4)
        x5, i5, x6, i6 = _cx(x5, i5, x6, i6)
        values = _join8(x0, x1, x2, x3, x4, x5, x6, x7, B)
        index = _join8(i0, i1, i2, i3, i4, i5, i6, i7, B)
    return values, index


@triton.jit
def _tile_offsets(n_rows, groups_per_row, inner, s_outer, s_chan, s_inner, B: tl.constexpr,
                  G: tl.constexpr, BLOCKED: tl.constexpr, CONTIGUOUS: tl.constexpr):  # fmt: skip
    """Per tile row: offset of member 0 in x and in the contiguous output, the column strides
    of both, and the row mask. A row group is r = (outer, channel group); it has ``inner``
    groups, one per inner position.

    Flat: tile rows walk all (r, position) pairs; with inner == 1 (specialised by Triton) the
    tile is [groups, G] contiguous. BLOCKED: program r * blocks + q takes positions
    q*B + [0, B) of row group r, provably contiguous along the inner dim.
    """
    if BLOCKED:  # a 1-D grid of (row group, block) pairs: CUDA caps a grid's y at 65535
        pid = tl.program_id(0).to(tl.int64)
        blocks = tl.cdiv(tl.cast(inner, tl.int64), B)  # inner + B - 1 can pass 2^31
        row = pid // blocks
        pos = (pid - row * blocks) * B + tl.arange(0, B)
        mask = pos < inner
    else:
        flat = tl.program_id(0).to(tl.int64) * B + tl.arange(0, B)
        row = flat // inner
        mask = row < n_rows  # not flat < n_rows * inner: that product can pass 2^31
        pos = flat - row * inner
    out_base = row * G * inner + pos
    if CONTIGUOUS:
        in_base = out_base
    else:
        outer = row // groups_per_row
        in_base = outer * s_outer + (row - outer * groups_per_row) * G * s_chan + pos * s_inner
    # column strides in 64 bits: member j sits j * stride away, which can pass 2^31
    return in_base, tl.cast(s_chan, tl.int64), out_base, tl.cast(inner, tl.int64), mask


@triton.jit
def _groupsort_network_kernel(x_ptr, grad_ptr, out_ptr, n_rows, groups_per_row, inner, s_outer,
                              s_chan, s_inner, B: tl.constexpr, G: tl.constexpr,
                              BLOCKED: tl.constexpr, CONTIGUOUS: tl.constexpr,
                              FLAT: tl.constexpr, BACKWARD: tl.constexpr):  # fmt: skip
    """Sorting-network path (G in 2, 4, 8): forward writes the sorted groups to ``out``;
    backward writes grad_x to ``out``, routing grad[k] to the member sorted into place k."""
    in_base, in_cs, out_base, out_cs, rows = _tile_offsets(
        n_rows, groups_per_row, inner, s_outer, s_chan, s_inner, B, G, BLOCKED, CONTIGUOUS
    )
    cols = tl.arange(0, G)
    if FLAT:  # contiguous groups along the last dim: one contiguous span, vectorised I/O
        span = tl.program_id(0).to(tl.int64) * (B * G) + tl.arange(0, B * G)
        span_mask = span // G < n_rows
        tile = tl.reshape(tl.load(x_ptr + span, mask=span_mask), (B, G))
    else:
        mask = rows[:, None] & (cols[None, :] < G)
        out_offsets = out_base[:, None] + cols[None, :] * out_cs
        tile = tl.load(x_ptr + in_base[:, None] + cols[None, :] * in_cs, mask=mask)
    values, index = _network(tile, B, G)
    if not BACKWARD:
        result = values
    else:
        if FLAT:
            grad = tl.reshape(tl.load(grad_ptr + span, mask=span_mask), (B, G))
        else:
            grad = tl.load(grad_ptr + out_offsets, mask=mask)
        if G == 2:
            g0, g1 = tl.split(grad)
            first, _ = tl.split(index)
            swap = first == 1
            result = tl.join(tl.where(swap, g1, g0), tl.where(swap, g0, g1))
        else:  # scatter: grad at sorted place k to the member's own place
            scatter_mask = rows[:, None] & (cols[None, :] < G)
            place = index.to(tl.int64) * out_cs
            tl.store(out_ptr + out_base[:, None] + place, grad, mask=scatter_mask)
    if not BACKWARD or G == 2:
        if FLAT:
            tl.store(out_ptr + span, tl.reshape(result, (B * G,)), mask=span_mask)
        else:
            tl.store(out_ptr + out_offsets, result, mask=mask)


@triton.jit
def _groupsort_rank_kernel(x_ptr, grad_ptr, out_ptr, n_rows, groups_per_row, inner, s_outer,
                           s_chan, s_inner, B: tl.constexpr, G: tl.constexpr, J: tl.constexpr,
                           BLOCKED: tl.constexpr, CONTIGUOUS: tl.constexpr,
                           BACKWARD: tl.constexpr):  # fmt: skip
    """Rank path (any G): member j goes to place rank_j = #{members ordered before j}, ranked
    J members at a time against all G. Forward scatters x; backward gathers grad."""
    in_base, in_cs, out_base, out_cs, rows = _tile_offsets(
        n_rows, groups_per_row, inner, s_outer, s_chan, s_inner, B, G, BLOCKED, CONTIGUOUS
    )
    for start in range(0, G, J):
        cols = start + tl.arange(0, J)
        mask = rows[:, None] & (cols[None, :] < G)
        tile = tl.load(x_ptr + in_base[:, None] + cols[None, :] * in_cs, mask=mask)
        rank = tl.zeros([B, J], tl.int32)
        member_ptr = x_ptr + in_base
        for i in range(G):
            member = tl.load(member_ptr, mask=rows)
            member_ptr += in_cs
            rank += _less(member[:, None], i, tile, cols[None, :]).to(tl.int32)
        place = rank.to(tl.int64) * out_cs
        if not BACKWARD:
            tl.store(out_ptr + out_base[:, None] + place, tile, mask=mask)
        else:
            grad = tl.load(grad_ptr + out_base[:, None] + place, mask=mask)
            tl.store(out_ptr + out_base[:, None] + cols[None, :] * out_cs, grad, mask=mask)


def _launch(x: torch.Tensor, grad: torch.Tensor | None, group_size: int, dim: int) -> torch.Tensor:
    """Run the forward (grad None) or backward kernel over x viewed as (outer, C, inner)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    shape, stride = tuple(x.shape), tuple(x.stride())
    outer = _common.collapse(shape[:dim], stride[:dim])
    inner = _common.collapse(shape[dim + 1 :], stride[dim + 1 :])
    if outer is None or inner is None:
        x = x.contiguous()
        shape, stride = tuple(x.shape), tuple(x.stride())
        outer = _common.collapse(shape[:dim], stride[:dim])
        inner = _common.collapse(shape[dim + 1 :], stride[dim + 1 :])
    (n_outer, s_outer), (n_inner, s_inner) = outer, inner
    groups_per_row = shape[dim] // group_size
    n_rows = n_outer * groups_per_row
    blocked = n_inner >= BLOCKED_INNER
    network = group_size in NETWORK_SIZES
    width = group_size if network else min(triton.next_power_of_2(group_size), _RANK_CHUNK)
    # Block sizes depend on the group size and dtype only: symbolic shapes under torch.compile
    # stay so.
    if network:
        tile = min(_TILE, _TILE_BYTES // x.element_size())
    else:
        tile = min(_RANK_TILE, _RANK_TILE_BYTES // x.element_size())
    block = min(tile // width, BLOCKED_INNER) if blocked else max(1, tile // width)
    span = n_inner if blocked else n_rows * n_inner
    grid = (n_rows * triton.cdiv(n_inner, block) if blocked else triton.cdiv(span, block),)
    args = (x, x if grad is None else grad, out, n_rows, groups_per_row, n_inner, s_outer,
            stride[dim], s_inner)  # fmt: skip
    flags = {"BLOCKED": blocked, "CONTIGUOUS": x.is_contiguous(), "BACKWARD": grad is not None}
    if network:
        flat = flags["CONTIGUOUS"] and not blocked and n_inner == 1
        _common.launch(_groupsort_network_kernel, grid)(
            *args, B=block, G=group_size, FLAT=flat, **flags
        )
    else:
        _common.launch(_groupsort_rank_kernel, grid)(*args, B=block, G=group_size, J=width, **flags)
    return out


def groupsort(x: torch.Tensor, group_size: int, dim: int) -> torch.Tensor:
    """Sort ascending (stable) inside consecutive groups of ``group_size`` along ``dim``."""
    _common.require_device(x)
    with _torch_private.direct_triton_launches(x):
        return _launch(x, None, group_size, dim % x.dim())


def groupsort_backward(
    grad: torch.Tensor, x: torch.Tensor, group_size: int, dim: int
) -> torch.Tensor:
    """Gradient of ``groupsort``: grad at sorted place k goes back to the member sorted there."""
    _common.require_device(x)
    with _torch_private.direct_triton_launches(grad, x):
        return _launch(x, grad.contiguous(), group_size, dim % x.dim())
