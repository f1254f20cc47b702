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

from .. import _backend, _checks, reference
from .._version import __version__
from ..modules import LipLinear


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
            print(f"  backend {name:11s} {device:4s}: {'usable' if reason is None else reason}")
    ok, detail = _self_check()
    print(f"self-check {'PASS' if ok else 'FAIL'}: {detail}")
    return 0 if ok else 1


def _build_cpp(args: argparse.Namespace) -> int:
    """Build (or find) the C++ backend now rather than at the first use of an op."""
    from .. import _cpp

    reason = _cpp.unusable_reason("cpu")
    if reason is not None:
        print(f"crvae build: the C++ backend is unusable: {reason}", file=sys.stderr)
        return 1
    print(
        "the C++ backend is built and loaded (cpu"
        + (", cuda" if _cpp.unusable_reason("cuda") is None else "")
        + ")"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, fast_settings, run_demo

    out = output_dir(args.out, "--out")
    settings = fast_settings() if args.fast else DemoSettings()
    settings = dataclasses.replace(settings, seed=args.seed, arch=args.arch)
    report = run_demo(settings, out, progress=not args.no_progress)
    return 0 if report.violations == 0 and report.target_met else 1


# Flags that shape the model (from the checkpoint when resuming) and training settings (from the
# checkpoint when resuming, unless given): dest -> default.
_MODEL_FLAGS = {
    "model": "lipschitz",
    "target_radius": 0.1,
    "r": 8.0,
    "p": 0.5,
    "lipschitz": None,
    "sigma_max": 0.1,
    "latent": 10,
    "arch": "mlp",
    "hidden": [512, 512],
    "channels": [32, 64],
    "method": "spectral",
}
_TRAIN_FLAGS = {"batch_size": 128, "lr": 1e-3, "beta": 1.0, "seed": 0}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _train_model(args: argparse.Namespace, input_dim: int):
    """A new model from the flags (their defaults filled in)."""
    from ..certify import RobustnessTarget
    from ..vae import ConvLipschitzVAE, LipschitzVAE, StandardVAE

    conv = args.arch == "conv"
    wrong = ["--hidden"] * (conv and args.hidden is not None) + ["--channels"] * (
        not conv and args.channels is not None
    )
    if conv and args.model == "standard":
        wrong.append("--model standard")
    if conv and args.method not in (None, "spectral"):
        wrong.append(f"--method {args.method}")
    if wrong:
        raise ValueError(
            f"{', '.join(wrong)} cannot be combined with --arch {args.arch or 'mlp'} (--hidden "
            "and --method shape the MLP, --channels the conv Lipschitz VAE; the standard VAE is "
            "an MLP)"
        )
    for dest, default in _MODEL_FLAGS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    hidden = tuple(args.hidden)
    if args.model == "standard":
        return StandardVAE(input_dim, args.latent, hidden=hidden)
    cls = ConvLipschitzVAE if conv else LipschitzVAE
    shape = (
        {"channels": tuple(args.channels)} if conv else {"hidden": hidden, "method": args.method}
    )
    if args.lipschitz:
        a, b, c = args.lipschitz
        return cls(input_dim, args.latent, lipschitz_decoder=a, lipschitz_mean=b,
                   lipschitz_std=c, sigma_max=args.sigma_max, **shape)  # fmt: skip
    target = RobustnessTarget(args.target_radius, args.r, args.p)
    return cls.from_target(input_dim, args.latent, target, sigma_max=args.sigma_max, **shape)


def _resumed_model(args: argparse.Namespace):
    """The checkpoint's model; its training settings fill the flags that were not given."""
    from ..checkpoint import load_checkpoint

    given = [_flag(d) for d in _MODEL_FLAGS if getattr(args, d) is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)} cannot be combined with --resume: the model comes from the "
            f"checkpoint {args.resume}; drop {'them' if len(given) > 1 else 'it'}"
        )
    saved = load_checkpoint(args.resume)
    for dest, default in _TRAIN_FLAGS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, saved.train_config.get(dest, default))
    return saved.model


def _train(args: argparse.Namespace) -> int:
    from ..checkpoint import check_writable, update_model
    from ..data import dataset
    from ..train import TrainConfig, _world, evaluate_elbo, init_distributed, train

    check_writable(args.out, "--out")
    model = _resumed_model(args) if args.resume else None
    for dest, default in _TRAIN_FLAGS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    init_distributed()
    rank, _ = _world()
    torch.manual_seed(args.seed)
    data = dataset(args.data, "train", seed=args.seed)
    if model is None:
        model = _train_model(args, data.input_dim)
    elif model.input_dim != data.input_dim:
        raise ValueError(
            f"--resume {args.resume} holds a model of {model.input_dim} features; --data "
            f"{args.data} has {data.input_dim}: pass the --data it was trained on"
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
        update_model(args.out, model)  # what is saved is what is reported, still resumable
        print(f"target {check.target}: a-priori radius {check.radius:.4g} (met)")
    test_elbo = evaluate_elbo(model, dataset(args.data, "test", seed=args.seed))
    print(f"-ELBO by epoch: {', '.join(f'{h:.1f}' for h in history)}")
    print(f"test ELBO {test_elbo:.2f}; checkpoint: {args.out}")
    return 0


def _load(args: argparse.Namespace, whole_split: bool = False):
    """The checkpoint's model (eval) and the inputs: the first --n of the split, or with
    ``whole_split`` the whole split unless --n is given (as a Dataset, for torchrun shares)."""
    from ..checkpoint import load_checkpoint
    from ..data import ImageDataset, dataset

    model = load_checkpoint(args.checkpoint).model.eval()
    data = dataset(args.data, args.split, seed=args.seed)
    if data.input_dim != model.input_dim:
        raise ValueError(
            f"the checkpoint expects {model.input_dim} features; {args.data} has {data.input_dim}"
        )
    n = args.n if args.n is not None else (None if whole_split else 100)
    if n is None:
        return model, data
    return model, ImageDataset(data.images[:n], data.labels[:n], data.image_shape, data.name)


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
    from ..certify import a_priori_radius, certify
    from ..checkpoint import check_writable
    from ..train import _world, init_distributed

    for flag, path in (("--json", args.json), ("--csv", args.csv)):
        if path:
            check_writable(path, flag)
    init_distributed()
    model, data = _load(args, whole_split=True)
    res = certify(model, data, args.r, args.p, args.bound, args.mode, args.batch_size,
                  progress=not args.no_progress)  # fmt: skip
    if _world()[0] != 0:
        return 0
    print(
        f"{len(res.radius)} inputs of {args.data}/{args.split}, r = {args.r:g}, p = {args.p:g}, "
        f"bound = {args.bound}, mode = {args.mode}"
    )
    print("constants (a, b, c): " + ", ".join(f"{c:.6g}" for c in res.constants))
    if res.mode != "global":
        print(f"joint mean-path bound b_joint: {res.b_used:.6g}")
    if getattr(model, "sigma_max", None):
        print(f"a-priori radius: {a_priori_radius(model, args.r, args.p, bound=args.bound):.6g}")
    print(f"certified radius: {_stats(res.radius)}")
    counts = {name: res.winner.count(name) for name in dict.fromkeys(res.winner)}
    print("winning bound: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    rows = _certificate_rows(res, data)
    if args.json:
        summary = {"r": res.r, "p": res.p, "bound": res.bound, "mode": res.mode,
                   "constants": list(res.constants), "b_used": res.b_used}  # fmt: skip
        summary |= {"radius": res.radius.tolist(), "winner": list(res.winner), "inputs": rows}
        Path(args.json).write_text(json.dumps(summary))
    if args.csv:
        _write_csv(Path(args.csv), rows)
    return 0


def _certificate_rows(res, data) -> list[dict]:
    """One row per input: its index and label, radius, each bound's radius, the winner."""
    labels = data.labels.tolist()
    v_norm = res.v_norm.tolist() if res.v_norm is not None else [None] * len(labels)
    return [
        {
            "index": i,
            "label": labels[i],
            "radius": float(res.radius[i]),
            "markov": float(res.markov[i]),
            "chi2": float(res.chi2[i]),
            "winner": res.winner[i],
            "sigma_l2": float(res.sigma_l2[i]),
            "sigma_inf": float(res.sigma_inf[i]),
            "v_norm": v_norm[i],
        }
        for i in range(len(labels))
    ]


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _attack(args: argparse.Namespace) -> int:
    from ..attacks import empirical_margin, latent_space, max_damage
    from ..certify import certify

    model, data = _load(args)
    x = data.images
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

    out = output_dir(args.out, "--out")
    settings = SweepSettings(lipschitz=tuple(args.lipschitz), seed=args.seed)
    if args.fast:
        fast = fast_settings()
        settings = dataclasses.replace(
            settings, hidden=fast.hidden, training=fast.training, evaluation=fast.evaluation
        )
    elif args.epochs:
        settings.training.epochs = args.epochs
    print(run_sweep(settings, out, progress=not args.no_progress))
    return 0


def _number(kind: type, minimum: float, inclusive: bool = False):
    """An argparse type: a finite ``kind`` above ``minimum`` (or at it, when ``inclusive``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        ok = value >= minimum if inclusive else value > minimum
        if not (ok and math.isfinite(value)):
            relation = ">=" if inclusive else ">"
            raise argparse.ArgumentTypeError(
                f"must be a finite number {relation} {minimum:g}, got {text}"
            )
        return value

    parse.__name__ = kind.__name__
    return parse


_positive_int, _positive_float = _number(int, 0), _number(float, 0)
_nonnegative_int, _nonnegative_float = _number(int, 0, True), _number(float, 0, True)


def _probability(text: str) -> float:
    value = _positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def output_dir(path: Path, flag: str) -> Path:
    """Refuse, before any work, an output folder that is a file or cannot be written."""
    from ..checkpoint import check_folder

    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file: name a folder for the outputs")
    return check_folder(path, f"{flag} {path}")


def _data_args(p: argparse.ArgumentParser, seed_default: int | None = 0) -> None:
    p.add_argument("--data", choices=("mnist", "digits"), default="mnist")
    p.add_argument("--seed", type=_nonnegative_int, default=seed_default,
                   help="seed of the split and of the run (default 0)")  # fmt: skip


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="a checkpoint written by 'crvae train'")
    _data_args(p)
    p.add_argument("--split", choices=("train", "test", "all"), default="test")
    p.add_argument("--n", type=_positive_int, help="how many inputs (default: certify the whole "
                   "split, attack 100)")  # fmt: skip
    p.add_argument("--r", type=_positive_float, default=8.0, help="reconstruction tolerance r")
    p.add_argument("--p", type=_probability, default=0.5, help="probability p in (0, 1)")


def _train_args(tr: argparse.ArgumentParser) -> None:
    """Model and training flags default to None: resolved from the checkpoint with --resume."""
    _data_args(tr, seed_default=None)
    model = tr.add_argument_group("model (taken from the checkpoint with --resume)")
    model.add_argument("--model", choices=("lipschitz", "standard"), help="default lipschitz")
    model.add_argument("--target-radius", type=_positive_float, help="default 0.1")
    model.add_argument("--r", type=_positive_float, help="default 8")
    model.add_argument("--p", type=_probability, help="default 0.5")
    model.add_argument("--lipschitz", type=_positive_float, nargs=3, metavar=("A", "B", "C"),
                       help="explicit budgets instead of --target-radius")  # fmt: skip
    model.add_argument("--sigma-max", type=_positive_float, help="default 0.1")
    model.add_argument("--latent", type=_positive_int, help="default 10")
    model.add_argument("--arch", choices=("mlp", "conv"),
                       help="the Lipschitz VAE's networks (default mlp)")  # fmt: skip
    model.add_argument("--hidden", type=_positive_int, nargs="+", help="default 512 512")
    model.add_argument("--channels", type=_positive_int, nargs="+",
                       help="channels per stride-2 conv (--arch conv; default 32 64)")  # fmt: skip
    model.add_argument("--method", choices=("spectral", "bjorck"), help="default spectral")
    run = tr.add_argument_group("training (the checkpoint's with --resume, unless given)")
    run.add_argument("--epochs", type=_positive_int, default=30, help="total epochs (default 30)")
    run.add_argument("--batch-size", type=_positive_int, help="default 128")
    run.add_argument("--lr", type=_positive_float, help="default 1e-3")
    run.add_argument("--beta", type=_nonnegative_float, help="KL weight (default 1)")
    tr.add_argument("--out", type=Path, required=True, help="checkpoint path (.pt)")
    tr.add_argument("--resume", type=Path, help="continue from this checkpoint")
    tr.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    """The ``crvae`` argument parser with one sub-command per job."""
    parser = argparse.ArgumentParser(prog="crvae", description=__doc__)
    parser.add_argument("--version", action="version", version=f"crvae_ext {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks of errors")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, parents=[common])
        p.set_defaults(run=run)
        return p

    command("info", _info, "versions, usable backends and a self-check")
    command("build", _build_cpp, "build the C++ backend now (else its first use does)")

    demo = command("demo", _demo, "Lipschitz vs standard VAE on the bundled MNIST")
    demo.add_argument("--fast", action="store_true", help="small networks, a minute or less")
    demo.add_argument("--arch", choices=("mlp", "conv"), default="mlp",
                      help="conv: also train and report the conv Lipschitz VAE")  # fmt: skip
    demo.add_argument("--out", type=Path, default=Path("crvae_out/demo"))
    demo.add_argument("--seed", type=_nonnegative_int, default=0)
    demo.add_argument("--no-progress", action="store_true")

    _train_args(command("train", _train, "train a VAE (torchrun for several processes)"))

    cert = command("certify", _certify, "certified radii of a trained model")
    _eval_args(cert)
    cert.add_argument("--bound", choices=("best", "markov", "chi2", "paper"), default="best")
    cert.add_argument("--mode", choices=("fast", "tight", "global"), default="fast",
                      help="fast: per-input closed forms; tight: + the decoder's local bound "
                      "(slower); global: the model's (a, b, c)")  # fmt: skip
    cert.add_argument("--batch-size", type=_positive_int, default=256)
    cert.add_argument("--json", type=Path, help="write the summary and one row per input here")
    cert.add_argument("--csv", type=Path, help="write one row per input here")
    cert.add_argument("--no-progress", action="store_true")

    att = command("attack", _attack, "attack a trained model")
    _eval_args(att)
    att.add_argument("--kind", choices=("max_damage", "latent"), default="max_damage")
    att.add_argument("--radius", type=_positive_float, nargs="+", default=[1.0])
    att.add_argument("--steps", type=_positive_int, default=50)
    att.add_argument("--restarts", type=_positive_int, default=1)
    att.add_argument("--margin", action="store_true", help="also the empirical margin")

    sw = command("sweep", _sweep, "the paper's MNIST sweep over L")
    sw.add_argument(
        "--lipschitz", type=_positive_float, nargs="+", default=[5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    )
    sw.add_argument("--epochs", type=_positive_int)
    sw.add_argument("--fast", action="store_true")
    sw.add_argument("--seed", type=_nonnegative_int, default=0)
    sw.add_argument("--out", type=Path, default=Path("crvae_out/sweep"))
    sw.add_argument("--no-progress", action="store_true")
    return parser


# Errors of the user's input or environment: one line, exit 2. Anything else is a defect of
# ours: one line too, exit 1, the traceback with --debug.
_USER_ERRORS = (ValueError, TypeError, OSError, ImportError, RuntimeError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``crvae`` console script; every error becomes one clear line on
    stderr (exit 2 for bad input, 1 for a defect), a traceback only with --debug."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"crvae {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        if isinstance(exc, _USER_ERRORS):
            print(f"crvae {args.command}: error: {_checks.one_line(exc)}", file=sys.stderr)
            return 2
        print(
            f"crvae {args.command}: internal error: {type(exc).__name__}: {_checks.one_line(exc)} "
            "(a defect of crvae_ext; rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
