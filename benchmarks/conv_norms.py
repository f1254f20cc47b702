"""What each Lipschitz convolution claims vs its TRUE operator norm, and the cost of the bound.

For each layer (64 -> 64 channels, 3x3, padding 1, on 32x32 inputs), fresh and after a few
training steps: the norm it claims (k = 1 for all), the true l2 operator norm of the map its
eval forward applies, bracketed by a converged Krylov estimate on the operator (a lower bound)
and ``conv_bounds.conv_operator_bound`` (a sound upper bound), and the norm of the reshaped
kernel matrix (out x in*9), which torch's spectral_norm normalises.
Usage: ``python -m benchmarks.conv_norms [--out benchmarks/results/conv_norms.md]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

import crvae_ext
from crvae_ext import _lip_conv
from crvae_ext.conv_bounds import ConvGeometry, conv_operator_bound

from .cases import CONV_KINDS, _conv

SIZE, CHANNELS = 32, 64


def plain_kernel(kind: str, layer: nn.Module) -> torch.Tensor:
    """The kernel each layer's eval forward applies (3x3, padding 1, zeros)."""
    layer.eval()
    with torch.no_grad():
        if isinstance(layer, crvae_ext.LipConv2d):
            return layer.effective_weight()
        if kind == "deel_spectral_conv2d":
            return layer.vanilla_export().weight.detach()
        return layer.weight.detach()


def lower_bound(kernel: torch.Tensor, size: int) -> float:
    """sigma = <u, A v> of a converged restarted Lanczos: below the true norm."""
    spec = _lip_conv.ConvSpec((1, 1), (1, 1), (1, 1), False, (0, 0))
    v = torch.randn(1, kernel.shape[1], size, size, dtype=torch.float64)
    w = kernel.double()
    sigma = torch.zeros(())
    for _ in range(8):
        v = _lip_conv.lanczos(w, v, spec, 48)
        sigma, _, v = _lip_conv.power_iteration(w, v, spec, 1)
    return float(sigma)


def train_a_little(layer: nn.Module, steps: int = 20) -> None:
    """A few Adam steps on a random regression, so each layer's weights move off their init."""
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(8, CHANNELS, SIZE, SIZE)
    target = torch.randn(8, CHANNELS, SIZE, SIZE)
    layer.train()
    for _ in range(steps):
        opt.zero_grad()
        (layer(x) - target).square().mean().backward()
        opt.step()


def rows() -> list[str]:
    geometry = ConvGeometry.of(3, 1, 1)
    out = []
    for trained in (False, True):
        for kind in CONV_KINDS[1:]:
            torch.manual_seed(0)
            layer = _conv(kind, CHANNELS, SIZE, "cpu")
            if layer is None:
                continue
            if trained:
                train_a_little(layer)
            kernel = plain_kernel(kind, layer)
            upper = conv_operator_bound(kernel, (SIZE, SIZE), geometry)
            lower = lower_bound(kernel, SIZE)
            reshaped = float(torch.linalg.matrix_norm(kernel.double().flatten(1), ord=2))
            claim = "1 (and its lipschitz_bound)" if kind == "lipconv2d" else "1"
            state = "20 Adam steps" if trained else "fresh"
            out.append(
                f"| {kind} | {state} | {claim} | {lower:.4f} | {upper:.4f} | {reshaped:.4f} |"
            )
    return out


def bound_cost(channels: int = 256, size: int = 32) -> list[str]:
    """Seconds for the sound bound of a channels -> channels 3x3 layer on size x size inputs."""
    torch.manual_seed(0)
    kernel = torch.randn(channels, channels, 3, 3)
    geometry = ConvGeometry.of(3, 1, 1)
    out = []
    for method in ("svd", "gram"):
        start = time.perf_counter()
        value = conv_operator_bound(kernel, (size, size), geometry, method)
        seconds = time.perf_counter() - start
        out.append(f"| {channels}->{channels} 3x3 on {size}x{size} | {method} | {seconds:.2f} s | "
                   f"{value:.6g} |")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conv_norms", description=__doc__)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    lines = [
        f"CPU, torch {torch.__version__}, crvae_ext {crvae_ext.__version__}; 64->64, 3x3, "
        "padding 1 (zeros), 32x32 inputs. True norm: between the Krylov lower bound and the "
        "sound FFT upper bound.",
        "",
        "| layer | weights | claimed Lipschitz constant | true norm >= | true norm <= | "
        "reshaped-kernel norm |",
        "|---|---|---|---|---|---|",
        *rows(),
        "",
        "Cost of the sound bound (one call, this machine):",
        "",
        "| layer | method | time | bound |",
        "|---|---|---|---|",
        *bound_cost(),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
