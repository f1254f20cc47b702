"""Local Lipschitz bounds of a decoder over an l2 ball of latent codes (certify's mode "tight").

The decoder is a chain h_l = W_l y_{l-1} + b_l, y_l = GroupSort_2(h_l) (l < L), out = act(h_L)
with act a sigmoid or the identity. Over a ball B(c, rho) its Jacobian is
D W_L P_{L-1} W_{L-1} ... P_1 W_1, each P_l a fixed permutation on the MaxMin pairs whose order
cannot flip on B and either order on the others, D the output slopes (sigmoid'(h_L) <= 1/4, at
most sigmoid' at the nearest point of h_L's interval to 0). With M_l the mean of the two
orders on each unstable pair (identity or swap on the stable ones) and Q_l the orthonormal
directions (e_a - e_b)/sqrt(2) of the unstable pairs, P_l = M_l + Q_l S Q_l^T (S = +-1
diagonal), so the Jacobian of y_l is F_l = A_l + R_l with A_l = M_l W_l A_{l-1} (A_0 = I) and
|R_l| <= r_l = |W_l| r_{l-1} + |Q_l^T W_l A_{l-1}| (r_0 = 0; P_l is orthogonal). Then
Lip(decoder on B) <= |D W_L A_{L-1}| + |D W_L| r_{L-1}. Pair orders and output intervals come
from the same bound layer by layer: |h_l(z) - h_l(c)|_j <= rho (|w_j^T A_{l-1}| +
|w_j| r_{l-1}) on the convex ball. Every product is float64 and inflated for its rounding.
README: "Local decoder bound".
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from . import bounds

_F64 = torch.float64
_EPS = torch.finfo(_F64).eps


class DecoderChain(NamedTuple):
    """A decoder in the form the local bound handles (float64, on the CPU)."""

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    norms: list[float]  # sound upper bounds on |W_l|_2
    sigmoid: bool
    # W_l Q for every pair direction q_p = (e_2p - e_2p+1)/sqrt(2) of the layer below (l >= 2)
    pair_columns: list[torch.Tensor | None]


def decoder_chain(decoder: nn.Module) -> DecoderChain | None:
    """The chain of a decoder made of linear maps with MaxMin (GroupSort of 2 along the features)
    between them and a sigmoid or nothing after the last; None for any other shape."""
    from .modules import GroupSort, MaxMin
    from .vae import _leaves

    leaves = _leaves(decoder)
    sigmoid = bool(leaves) and type(leaves[-1]) is nn.Sigmoid
    if leaves and type(leaves[-1]) in (nn.Sigmoid, nn.Identity):
        leaves = leaves[:-1]
    linear, sorts = leaves[0::2], leaves[1::2]
    if not linear or len(linear) != len(sorts) + 1:
        return None
    for sort in sorts:
        if type(sort) not in (GroupSort, MaxMin) or sort.group_size != 2 or sort.dim not in (1, -1):
            return None
    weights = [bounds.linear_map(layer) for layer in linear]
    if any(w is None for w in weights):
        return None
    biases = [
        layer.bias.detach().to("cpu", _F64)
        if layer.bias is not None
        else torch.zeros(w.shape[0], dtype=_F64)
        for layer, w in zip(linear, weights, strict=True)
    ]
    norms = [bounds.spectral_norm_bound(w) for w in weights]
    columns = [None] + [(w[:, 0::2] - w[:, 1::2]) / math.sqrt(2) for w in weights[1:]]
    return DecoderChain(weights, biases, norms, sigmoid, columns)


def _pairs(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (first, second) members of consecutive pairs along dim 1."""
    paired = t.unflatten(1, (-1, 2))
    return paired[:, :, 0], paired[:, :, 1]


def _mean_permute(rows: torch.Tensor, order: torch.Tensor, stable: torch.Tensor) -> torch.Tensor:
    """M rows: per pair, identity (order 0) or swap (order 1) where stable, the mean elsewhere."""
    first, second = _pairs(rows)
    keep = (order == 0).unsqueeze(-1)
    fixed_a, fixed_b = torch.where(keep, first, second), torch.where(keep, second, first)
    mean = (first + second) / 2
    out_a = torch.where(stable.unsqueeze(-1), fixed_a, mean)
    out_b = torch.where(stable.unsqueeze(-1), fixed_b, mean)
    return torch.stack([out_a, out_b], dim=2).flatten(1, 2)


def _spectral(m: torch.Tensor) -> torch.Tensor:
    """Upper bounds on the spectral norms of a batch of float64 matrices, from the small Gram
    matrix G (k x k, k the smaller side): |m|^2 <= lambda_max(fl(G)) + |G - fl(G)|_2 +
    (eigvalsh's backward error), the last two at most (n eps + 8 k eps) |m|_F^2 (n the inner
    dimension of the Gram product). 0 for empty matrices."""
    rows, cols = m.shape[-2:]
    if rows == 0 or cols == 0:
        return torch.zeros(m.shape[0], dtype=_F64)
    gram = m.transpose(-2, -1) @ m if cols <= rows else m @ m.transpose(-2, -1)
    top = torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0)
    frob2 = m.square().sum(dim=(-2, -1))
    slack = (max(rows, cols) + 8 * min(rows, cols) + 4) * _EPS
    return torch.sqrt(top + slack * frob2) * (1 + 2 * _EPS)


def _column_pair_energy(rows: torch.Tensor) -> torch.Tensor:
    """C[i, p] = |rows_i^T q_p|^2 = (rows[i, 2p] - rows[i, 2p + 1])^2 / 2 for the unit
    directions q_p = (e_2p - e_2p+1) / sqrt(2) of the previous layer's pairs."""
    first, second = _pairs(rows)
    return (first - second).square() / 2


def local_lipschitz(chain: DecoderChain, center: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """Per input, an upper bound on the decoder's Lipschitz constant over B(center, rho).

    ``center`` (batch x m) and ``rho`` (batch) in float64. Also valid on any smaller ball.
    For a row v of the next layer, |v^T R_l| <= |v^T Q_l| s_l + |v| |W_l| r_{l-1} with
    s_l = |Q_l^T W_l A_{l-1}| and r_l = s_l + |W_l| r_{l-1}: the unstable pairs of the layer
    just below are counted against v itself, the deeper ones by norms.
    """
    if len(chain.weights) == 3:
        return _local_three(chain, center, rho)
    batch, m = center.shape
    rho = rho.to(_F64).reshape(batch, 1)
    y = center.to(_F64)
    mean = torch.eye(m, dtype=_F64).expand(batch, m, m)  # A_0
    magnitude = mean  # |M| |W| ... chain, for the rounding of the products
    zeros = torch.zeros(batch, 1, dtype=_F64)
    r_prev, r_deeper, s_prev, unstable_prev = zeros, zeros, zeros, None
    depth = 0  # inner dimensions summed so far: the products' rounding grows with them
    last = len(chain.weights) - 1
    for index, (w, bias) in enumerate(zip(chain.weights, chain.biases, strict=True)):
        h = y @ w.t() + bias
        wa = w @ mean  # W_l A_{l-1}: batch x n x m
        wa_mag = w.abs() @ magnitude
        depth += w.shape[1]
        gamma = depth * _EPS
        # the rows whose reach over the ball decides this layer: pair differences, or outputs
        rows = w if index == last else w[0::2] - w[1::2]
        rows_a = wa if index == last else _pairs(wa)[0] - _pairs(wa)[1]
        rows_mag = wa_mag if index == last else _pairs(wa_mag)[0] + _pairs(wa_mag)[1]
        rows_norm = torch.linalg.vector_norm(rows, dim=-1)
        mean_part = torch.linalg.vector_norm(rows_a, dim=-1)
        mean_part = mean_part + gamma * torch.linalg.vector_norm(rows_mag, dim=-1)
        rest = torch.zeros_like(mean_part)
        if unstable_prev is not None:
            energy = _column_pair_energy(rows)  # rows x previous pairs
            towards = torch.sqrt(unstable_prev.to(_F64) @ energy.t())  # |v^T Q_{l-1}|
            rest = towards * s_prev + rows_norm * chain.norms[index - 1] * r_deeper
        reach = rho * (mean_part + rest) * (1 + 1e-9)
        if index == last:
            break
        h_first, h_second = _pairs(h)
        gap = h_first - h_second
        slack = 1e-9 * (h_first.abs() + h_second.abs() + 1)  # forward rounding in float64
        stable = gap.abs() > reach + slack
        order = (gap > 0).to(torch.int64)  # 1: the pair is swapped (GroupSort sorts ascending)
        unstable_rows = torch.where(stable.unsqueeze(-1), 0.0, rows_a / math.sqrt(2))
        spread = _spectral(unstable_rows)  # s_l = |Q_l^T W_l A_{l-1}|
        spread = spread + gamma * torch.linalg.matrix_norm(
            torch.where(stable.unsqueeze(-1), 0.0, rows_mag)
        )
        r_deeper = r_prev
        s_prev = spread.unsqueeze(-1)
        r_prev = s_prev + chain.norms[index] * r_prev
        unstable_prev = ~stable
        mean = _mean_permute(wa, order, stable)
        magnitude = _mean_permute(wa_mag, order, stable)
        y = _sorted_pairs(h)
    slope = _output_slopes(chain, h, reach)
    core = _spectral(slope.unsqueeze(-1) * wa)
    core = core + gamma * torch.linalg.matrix_norm(slope.unsqueeze(-1) * wa_mag)
    rows_norm = torch.linalg.vector_norm(w, dim=-1)
    whole = torch.sqrt(slope.square() @ rows_norm.square()) * (1 + w.shape[1] * _EPS)
    whole = torch.minimum(whole, slope.amax(dim=-1) * chain.norms[-1])  # |D W_L|_2
    total = core
    if unstable_prev is not None:
        energy = _column_pair_energy(w)  # outputs x previous pairs
        towards = torch.sqrt(((slope.square() @ energy) * unstable_prev.to(_F64)).sum(-1))
        total = total + towards * s_prev.squeeze(-1)
        total = total + whole * chain.norms[-2] * r_deeper.squeeze(-1)
    return total * (1 + 16 * _EPS)


def _output_slopes(chain: DecoderChain, h: torch.Tensor, reach: torch.Tensor) -> torch.Tensor:
    """Upper bounds on the output activation's slopes where each output's pre-activation lies
    within ``reach`` of ``h``: sigmoid' at the interval's point nearest 0 (at most 1/4), or 1."""
    if not chain.sigmoid:
        return torch.ones_like(h)
    nearest = (h.abs() - reach - 1e-9 * (h.abs() + 1)).clamp_min(0)
    slope = torch.sigmoid(nearest) * torch.sigmoid(-nearest)
    return torch.minimum(slope * (1 + 1e-12), torch.full_like(slope, 0.25))


def _gather_columns(columns: torch.Tensor, unstable: torch.Tensor) -> torch.Tensor:
    """Per input, the columns of ``columns`` (n x pairs) at its unstable pairs, zero-padded to
    the batch's largest count (zero columns change no norm)."""
    count = int(unstable.sum(-1).max()) if unstable.numel() else 0
    if count == 0:
        return columns.new_zeros(unstable.shape[0], columns.shape[0], 0)
    order = torch.argsort((~unstable).to(torch.int8), dim=-1, stable=True)[:, :count]
    picked = columns.t()[order].transpose(1, 2)  # batch x n x count
    keep = torch.gather(unstable, 1, order).unsqueeze(1)
    return torch.where(keep, picked, 0.0)


def _sorted_pairs(h: torch.Tensor) -> torch.Tensor:
    """GroupSort of 2 along dim 1."""
    first, second = _pairs(h)
    low, high = torch.minimum(first, second), torch.maximum(first, second)
    return torch.stack([low, high], 2).flatten(1, 2)


def _local_three(chain: DecoderChain, center: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """The bound for decoders of three linear layers (two MaxMin layers), with the deviations
    of the first MaxMin layer carried through the second as matrices instead of norms:
    J = D W3 (M2 W2 M1 W1 + Q2 S2 Q2^T W2 M1 W1 + P2 W2 Q1 S1 Q1^T W1), and
    |D W3 P2 W2 Q1| <= |D W3 M2 W2 Q1| + |D W3 Q2| |Q2^T W2 Q1|."""
    (w1, w2, w3), (b1, b2, b3) = chain.weights, chain.biases
    batch = center.shape[0]
    rho = rho.to(_F64).reshape(batch, 1)
    root2 = math.sqrt(2)
    # Rounding of every product chain below (W3 M2 W2 M1 W1, W3 M2 W2 Q1, their rows and pair
    # differences): entries within gamma_N of the chain of |factors|, whose Frobenius norm is at
    # most sqrt(2) |W3|_F |W2|_F |W1|_F (M averages or permutes rows, |W2| |Q1| has columns
    # (|w_a| + |w_b|) / sqrt(2)); doubled for the pair differences and averages taken.
    frob = math.prod(float(torch.linalg.matrix_norm(w)) for w in chain.weights)
    rounding = 2 * math.sqrt(2) * (sum(w.shape[1] for w in chain.weights) + 16) * _EPS * frob

    h1 = center.to(_F64) @ w1.t() + b1
    gap1 = _pairs(h1)[0] - _pairs(h1)[1]
    rows1 = w1[0::2] - w1[1::2]
    slack1 = 1e-9 * (h1.abs().unflatten(1, (-1, 2)).sum(-1) + 1)
    stable1 = gap1.abs() > rho * torch.linalg.vector_norm(rows1, dim=-1) * (1 + 1e-9) + slack1
    s1 = _spectral(torch.where(stable1.unsqueeze(-1), 0.0, rows1 / root2)).unsqueeze(-1) + rounding
    a1 = _mean_permute(w1.expand(batch, -1, -1), (gap1 > 0).to(torch.int64), stable1)
    wq1 = _gather_columns(chain.pair_columns[1], ~stable1)  # W2 Q1: batch x n2 x k1

    h2 = _sorted_pairs(h1) @ w2.t() + b2
    wa = w2 @ a1  # W2 A1
    rows2_a = _pairs(wa)[0] - _pairs(wa)[1]
    rows2_q = _pairs(wq1)[0] - _pairs(wq1)[1]  # (w2_a - w2_b)^T Q1
    reach2 = rho * (torch.linalg.vector_norm(rows2_a, dim=-1)
                    + torch.linalg.vector_norm(rows2_q, dim=-1) * s1 + 2 * rounding)  # fmt: skip
    gap2 = _pairs(h2)[0] - _pairs(h2)[1]
    slack2 = 1e-9 * (h2.abs().unflatten(1, (-1, 2)).sum(-1) + 1)
    stable2 = gap2.abs() > reach2 * (1 + 1e-9) + slack2
    order2 = (gap2 > 0).to(torch.int64)
    s2 = _spectral(torch.where(stable2.unsqueeze(-1), 0.0, rows2_a / root2)).unsqueeze(-1)
    q2wq1 = _spectral(torch.where(stable2.unsqueeze(-1), 0.0, rows2_q / root2)).unsqueeze(-1)
    s2, q2wq1 = s2 + rounding, q2wq1 + rounding
    a2 = _mean_permute(wa, order2, stable2)  # A2 = M2 W2 A1
    mwq1 = _mean_permute(wq1, order2, stable2)  # M2 W2 Q1
    wq2 = _gather_columns(chain.pair_columns[2], ~stable2)  # W3 Q2

    h3 = _sorted_pairs(h2) @ w3.t() + b3
    core_rows = w3 @ a2
    deep_rows = w3 @ mwq1
    row = lambda t: torch.linalg.vector_norm(t, dim=-1) + rounding  # noqa: E731
    q2_rows = row(wq2)
    reach3 = rho * (row(core_rows) + q2_rows * s2 + (row(deep_rows) + q2_rows * q2wq1) * s1)
    slope = _output_slopes(chain, h3, reach3 * (1 + 1e-9))
    d = slope.unsqueeze(-1)
    top = slope.amax(-1)
    core = _spectral(d * core_rows) + top * rounding
    dq2 = _spectral(d * wq2) + top * rounding
    deep = _spectral(d * deep_rows) + top * rounding
    s1, s2, q2wq1 = s1.squeeze(-1), s2.squeeze(-1), q2wq1.squeeze(-1)
    return (core + dq2 * s2 + (deep + dq2 * q2wq1) * s1) * (1 + 16 * _EPS)
