"""The ``crvae`` command line: info, demo, train, certify, attack, sweep."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

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


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, fast_settings, run_demo

    settings = fast_settings() if args.fast else DemoSettings()
    settings = dataclasses.replace(settings, seed=args.seed)
    report = run_demo(settings, args.out, progress=not args.no_progress)
    return 0 if report.violations == 0 and report.target_met else 1


def _train(args: argparse.Namespace) -> int:
    from .certify import RobustnessTarget
    from .checkpoint import save_checkpoint
    from .data import dataset
    from .train import TrainConfig, _world, evaluate_elbo, init_distributed, train
    from .vae import LipschitzVAE, StandardVAE

    init_distributed()
    rank, _ = _world()
    torch.manual_seed(args.seed)
    data = dataset(args.data, "train", seed=args.seed)
    dim, hidden = data.input_dim, tuple(args.hidden)
    if args.model == "standard":
        model = StandardVAE(dim, args.latent, hidden=hidden)
    elif args.lipschitz:
        a, b, c = args.lipschitz
        model = LipschitzVAE(
            dim,
            args.latent,
            hidden=hidden,
            lipschitz_decoder=a,
            lipschitz_mean=b,
            lipschitz_std=c,
            sigma_max=args.sigma_max,
            method=args.method,
        )
    else:
        target = RobustnessTarget(args.target_radius, args.r, args.p)
        model = LipschitzVAE.from_target(
            dim, args.latent, target, sigma_max=args.sigma_max, hidden=hidden, method=args.method
        )
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        beta=args.beta,
        seed=args.seed,
        checkpoint=str(args.out),
        progress=not args.no_progress,
    )
    history = train(model, data, config, resume=args.resume)
    if rank != 0:
        return 0
    if getattr(model, "target", None) is not None:
        check = model.enforce_target()
        print(f"target {check.target}: a-priori radius {check.radius:.4g} (met)")
        save_checkpoint(
            args.out,
            model,
            epoch=config.epochs,
            history=history,
            train_config=dataclasses.asdict(config),
        )
    test_elbo = evaluate_elbo(model, dataset(args.data, "test", seed=args.seed))
    print(f"-ELBO by epoch: {', '.join(f'{h:.1f}' for h in history)}")
    print(f"test ELBO {test_elbo:.2f}; checkpoint: {args.out}")
    return 0


def _load(args: argparse.Namespace):
    from .checkpoint import load_checkpoint
    from .data import dataset

    model = load_checkpoint(args.checkpoint).model.eval()
    data = dataset(args.data, args.split, seed=args.seed)
    if data.input_dim != model.input_dim:
        raise ValueError(
            f"the checkpoint expects {model.input_dim} features; {args.data} has {data.input_dim}"
        )
    return model, data.images[: args.n]


def _stats(values: torch.Tensor) -> str:
    v = values.double()
    finite = v[torch.isfinite(v)]
    if finite.numel() == 0:
        return f"all {len(v)} infinite"
    return (
        f"min {float(finite.min()):.4g}, median {float(v.median()):.4g}, "
        f"mean {float(finite.mean()):.4g}, max {float(finite.max()):.4g}"
        + (f" ({len(v) - finite.numel()} infinite)" if finite.numel() < len(v) else "")
    )


def _certify(args: argparse.Namespace) -> int:
    from .certify import a_priori_radius, certify

    model, x = _load(args)
    res = certify(model, x, args.r, args.p, args.bound)
    print(
        f"{len(x)} inputs of {args.data}/{args.split}, r = {args.r:g}, p = {args.p:g}, "
        f"bound = {args.bound}"
    )
    print("constants (a, b, c): " + ", ".join(f"{c:.6g}" for c in res.constants))
    if getattr(model, "sigma_max", None):
        print(f"a-priori radius: {a_priori_radius(model, args.r, args.p, bound=args.bound):.6g}")
    print(f"certified radius: {_stats(res.radius)}")
    wins = sum(w == "markov" for w in res.winner)
    print(f"winning bound: markov {wins}, chi2 {len(res.winner) - wins}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "radius": res.radius.tolist(),
                    "winner": list(res.winner),
                    "constants": list(res.constants),
                }
            )
        )
    return 0


def _attack(args: argparse.Namespace) -> int:
    from .attacks import empirical_margin, latent_space, max_damage
    from .certify import certify

    model, x = _load(args)
    for radius in args.radius:
        if args.kind == "max_damage":
            res = max_damage(model, x, radius, args.steps, args.restarts)
            print(f"max damage at |d| <= {radius:g}: E|Delta| {_stats(res.objective)}")
        else:
            target = x.roll(1, dims=0)
            res = latent_space(model, x, target, radius, args.steps, args.restarts)
            print(f"latent-space attack at |d| <= {radius:g}: KL to target {_stats(res.objective)}")
    if args.margin:
        margin = empirical_margin(model, x, args.r, args.p).margin
        cert = certify(model, x, args.r, args.p).radius
        print(f"empirical margin: {_stats(margin)}")
        print(f"violations (certified > margin): {int((cert > margin).sum())} of {len(x)}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .demo import fast_settings
    from .sweep import SweepSettings, run_sweep

    settings = SweepSettings(lipschitz=tuple(args.lipschitz), seed=args.seed)
    if args.fast:
        fast = fast_settings()
        settings = dataclasses.replace(
            settings, hidden=fast.hidden, training=fast.training, evaluation=fast.evaluation
        )
    elif args.epochs:
        settings.training.epochs = args.epochs
    print(run_sweep(settings, args.out, progress=not args.no_progress))
    return 0


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _probability(text: str) -> float:
    value = _positive(float)(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", choices=("mnist", "digits"), default="mnist")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of the run")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="a checkpoint written by 'crvae train'")
    _data_args(p)
    p.add_argument("--split", choices=("train", "test", "all"), default="test")
    p.add_argument("--n", type=_positive(int), default=100, help="how many inputs")
    p.add_argument("--r", type=_positive(float), default=8.0, help="reconstruction tolerance r")
    p.add_argument("--p", type=_probability, default=0.5, help="probability p in (0, 1)")


def build_parser() -> argparse.ArgumentParser:
    """The ``crvae`` argument parser with one sub-command per job."""
    parser = argparse.ArgumentParser(prog="crvae", description=__doc__)
    parser.add_argument("--version", action="version", version=f"crvae_ext {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="versions, usable backends and a self-check").set_defaults(
        run=_info
    )

    demo = sub.add_parser("demo", help="Lipschitz vs standard VAE on the bundled MNIST")
    demo.add_argument("--fast", action="store_true", help="small networks, a minute or less")
    demo.add_argument("--out", type=Path, default=Path("crvae_out/demo"))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(run=_demo)

    tr = sub.add_parser("train", help="train a VAE (torchrun for several processes)")
    _data_args(tr)
    tr.add_argument("--model", choices=("lipschitz", "standard"), default="lipschitz")
    tr.add_argument("--target-radius", type=_positive(float), default=0.1)
    tr.add_argument("--r", type=_positive(float), default=8.0)
    tr.add_argument("--p", type=_probability, default=0.5)
    tr.add_argument(
        "--lipschitz",
        type=_positive(float),
        nargs=3,
        metavar=("A", "B", "C"),
        help="explicit budgets instead of --target-radius",
    )
    tr.add_argument("--sigma-max", type=_positive(float), default=0.1)
    tr.add_argument("--latent", type=_positive(int), default=10)
    tr.add_argument("--hidden", type=_positive(int), nargs="+", default=[512, 512])
    tr.add_argument("--method", choices=("spectral", "bjorck"), default="spectral")
    tr.add_argument("--epochs", type=_positive(int), default=30)
    tr.add_argument("--batch-size", type=_positive(int), default=128)
    tr.add_argument("--lr", type=_positive(float), default=1e-3)
    tr.add_argument("--beta", type=float, default=1.0)
    tr.add_argument("--out", type=Path, required=True, help="checkpoint path (.pt)")
    tr.add_argument("--resume", type=Path, help="continue from this checkpoint")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(run=_train)

    cert = sub.add_parser("certify", help="certified radii of a trained model")
    _eval_args(cert)
    cert.add_argument("--bound", choices=("best", "markov", "chi2", "paper"), default="best")
    cert.add_argument("--json", type=Path, help="also write the radii here")
    cert.set_defaults(run=_certify)

    att = sub.add_parser("attack", help="attack a trained model")
    _eval_args(att)
    att.add_argument("--kind", choices=("max_damage", "latent"), default="max_damage")
    att.add_argument("--radius", type=_positive(float), nargs="+", default=[1.0])
    att.add_argument("--steps", type=_positive(int), default=50)
    att.add_argument("--restarts", type=_positive(int), default=1)
    att.add_argument("--margin", action="store_true", help="also the empirical margin")
    att.set_defaults(run=_attack)

    sw = sub.add_parser("sweep", help="the paper's MNIST sweep over L")
    sw.add_argument(
        "--lipschitz", type=_positive(float), nargs="+", default=[5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    )
    sw.add_argument("--epochs", type=_positive(int))
    sw.add_argument("--fast", action="store_true")
    sw.add_argument("--seed", type=int, default=0)
    sw.add_argument("--out", type=Path, default=Path("crvae_out/sweep"))
    sw.add_argument("--no-progress", action="store_true")
    sw.set_defaults(run=_sweep)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``crvae`` console script; library errors become one clear line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError, RuntimeError) as exc:
        print(f"crvae {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
