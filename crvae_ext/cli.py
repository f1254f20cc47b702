"""The ``crvae`` command line: ``crvae info`` (environment and self-check)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from . import _backend, reference
from ._version import __version__
from .modules import LipLinear


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception as exc:
        return f"not importable ({type(exc).__name__})"


def _self_check(lipschitz: float = 2.0, seed: int = 0) -> tuple[bool, str]:
    """LipLinear on a random Gaussian weight vs the float64 SVD: |W_eff|_2 = k and bound >= it."""
    gen = torch.Generator().manual_seed(seed)
    layer = LipLinear(96, 64, lipschitz=lipschitz)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(64, 96, generator=gen))
    layer.converge_().eval()
    exact = reference.spectral_norm_exact(layer.effective_weight())
    bound = layer.lipschitz_bound()
    ok = abs(exact - lipschitz) <= 1e-4 * lipschitz and bound >= exact * (1 - 1e-6)
    return ok, f"k={lipschitz}: exact |W_eff|_2={exact:.7f}, lipschitz_bound={bound:.7f}"


def _info(args: argparse.Namespace) -> int:
    print(f"crvae_ext {__version__}")
    print(f"torch {torch.__version__} (CUDA {'available' if torch.cuda.is_available() else 'no'})")
    print(f"triton {_triton_version()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name in _backend.BACKENDS:
        for device in devices:
            reason = _backend.unusable_reason(name, device)
            print(f"  backend {name:6s} {device:4s}: {'usable' if reason is None else reason}")
    ok, detail = _self_check()
    print(f"self-check {'PASS' if ok else 'FAIL'}: {detail}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    """The ``crvae`` argument parser with one sub-command per job."""
    parser = argparse.ArgumentParser(prog="crvae", description=__doc__)
    parser.add_argument("--version", action="version", version=f"crvae_ext {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, usable backends and a LipLinear self-check")
    info.set_defaults(run=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``crvae`` console script."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
