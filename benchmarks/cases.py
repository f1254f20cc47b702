"""Benchmark cases, one group per comparison, shared by pytest-benchmark files and ``compare``.

Every case name is the op's name (``liplinear_spectral[cpp]``, ``groupsort[triton]``, ...);
each group names its baseline (nn.Linear, ReLU, two torch matvecs, the standard VAE, the peer
attack). Layer cases time the way a hidden layer trains: x requires grad (3 GEMMs per step).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import crvae_ext
import crvae_ext.functional as F
from crvae_ext import LipLinear, LipschitzVAE, StandardVAE, certify, reference
from crvae_ext.attacks import max_damage

Case = Callable[[], object]
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Group:
    """Cases compared side by side against ``baseline``, with optional memory/bandwidth data."""

    title: str
    baseline: str
    cases: dict[str, Case]
    forwards: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)
    bytes_moved: dict[str, int] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    rounds: int = 20
    items: int | None = None  # inputs per call, for a throughput column


def _layer(kind: str, width: int, device, dtype) -> nn.Module | None:
    big_cpu = torch.device(device).type == "cpu" and width > 1024
    if kind == "linear":
        return nn.Linear(width, width, device=device, dtype=dtype)
    if kind == "torch_spectral_norm":
        return spectral_norm(nn.Linear(width, width, device=device, dtype=dtype))
    if kind == "liplinear_bjorck":
        if big_cpu:  # 20 Björck GEMMs on the weight per step: minutes at this size on a CPU
            return None
        return LipLinear(width, width, method="bjorck", device=device, dtype=dtype)
    if kind == "deel_spectral_linear":
        if big_cpu or importlib.util.find_spec("deel") is None:
            return None
        from deel.torchlip import SpectralLinear

        return SpectralLinear(width, width).to(device, dtype)
    backend = kind[len("liplinear_spectral[") : -1]
    return LipLinear(width, width, backend=backend, device=device, dtype=dtype)


def bench_backends(device) -> list[str]:
    """Backends worth timing on ``device``: Triton's CPU interpreter is a test tool, not one."""
    device = torch.device(device)
    return [b for b in crvae_ext.backends(device) if not (b == "triton" and device.type == "cpu")]


def layer_kinds(device) -> list[str]:
    """nn.Linear, LipLinear per usable backend and method, and the peers."""
    spectral = [f"liplinear_spectral[{b}]" for b in bench_backends(device)]
    return ["linear", *spectral, "torch_spectral_norm", "liplinear_bjorck", "deel_spectral_linear"]


def liplinear_groups(
    batch: int, width: int, device, dtype=torch.float32, phases=("train", "forward", "backward")
) -> list[Group]:
    """Forward, backward and train step (fwd + bwd + SGD) of each layer kind."""
    torch.manual_seed(0)
    x = torch.randn(batch, width, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(batch, width, device=device, dtype=dtype)
    label = f"B={batch} {width}x{width} {DTYPE_NAMES[dtype]}"
    groups = []
    for phase in phases:  # fresh layers per phase: a train step must not touch saved graphs
        layers = {k: m for k in layer_kinds(device) if (m := _layer(k, width, device, dtype))}
        cases, forwards = {}, {}
        for name, layer in layers.items():
            forwards[name] = lambda layer=layer: layer(x)
            if phase == "forward":
                cases[name] = forwards[name]
            elif phase == "backward":
                out = layer(x)
                cases[name] = lambda out=out: out.backward(grad, retain_graph=True)
            else:
                opt = torch.optim.SGD(layer.parameters(), lr=1e-6)

                def step(layer=layer, opt=opt) -> None:
                    opt.zero_grad(set_to_none=True)
                    layer(x).backward(grad)
                    opt.step()

                cases[name] = step
        groups.append(Group(f"liplinear {phase} {label}", "linear", cases, forwards))
    return groups


def _conv(kind: str, channels: int, size: int, device) -> nn.Module | None:
    """A 3x3, stride-1, padding-1 convolution of each kind (None: the peer is not installed)."""
    args = (channels, channels, 3)
    if kind == "conv2d":
        return nn.Conv2d(*args, padding=1, device=device)
    if kind == "lipconv2d":
        return crvae_ext.LipConv2d(*args, padding=1, input_size=size, device=device)
    if kind == "torch_spectral_norm_conv":
        return spectral_norm(nn.Conv2d(*args, padding=1, device=device))
    if kind == "deel_spectral_conv2d":
        if importlib.util.find_spec("deel") is None:
            return None
        from deel.torchlip import SpectralConv2d

        return SpectralConv2d(*args, padding=1).to(device)
    if kind == "orthogonium_ortho_conv2d":
        if importlib.util.find_spec("orthogonium") is None:
            return None
        from orthogonium.layers import AdaptiveOrthoConv2d

        return AdaptiveOrthoConv2d(*args, padding=1, padding_mode="zeros").to(device)
    raise ValueError(kind)


CONV_KINDS = (
    "conv2d",
    "lipconv2d",
    "torch_spectral_norm_conv",
    "deel_spectral_conv2d",
    "orthogonium_ortho_conv2d",
)


def lip_conv_group(batch: int, channels: int, size: int, device) -> Group:
    """Train step (fwd + bwd + SGD) of LipConv2d vs nn.Conv2d and the peers, as a hidden
    layer trains (x requires grad), 3x3 stride 1, fp32."""
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    cases, forwards = {}, {}
    for kind in CONV_KINDS:
        layer = _conv(kind, channels, size, device)
        if layer is None:
            continue
        opt = torch.optim.SGD(layer.parameters(), lr=1e-6)
        forwards[kind] = lambda layer=layer: layer(x)

        def step(layer=layer, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            layer(x).backward(grad)
            opt.step()

        cases[kind] = step
    title = f"lip_conv2d train B={batch} {channels}->{channels} {size}x{size} 3x3 fp32"
    return Group(title, "conv2d", cases, forwards, rounds=10)


GRAD_LAYOUTS = ("dense", "expanded", "transposed")


def upstream_gradient(x: torch.Tensor, layout: str) -> torch.Tensor:
    """An output gradient shaped like ``x``: dense, expanded (stride 0, what y.sum() gives) or
    transposed (a column-major view)."""
    if layout == "expanded":
        return torch.ones((), device=x.device, dtype=x.dtype).expand(x.shape)
    if layout == "transposed":
        return torch.randn(x.shape[::-1], device=x.device, dtype=x.dtype).t()
    return torch.randn_like(x)


def groupsort_group(
    rows: int, cols: int, device, dtype=torch.float32, group_size=2, grad_layout="dense"
) -> Group:
    """GroupSort fwd + bwd per backend vs the torch.sort way vs ReLU (same bytes as ReLU), the
    upstream gradient in ``grad_layout`` for all of them."""
    torch.manual_seed(0)
    x = torch.randn(rows, cols, device=device, dtype=dtype, requires_grad=True)
    grad = upstream_gradient(x, grad_layout)

    forwards = {
        "relu": lambda: torch.relu(x),
        "torch_sort": lambda: x.unflatten(1, (-1, group_size)).sort(dim=2).values.flatten(1),
    }
    for b in bench_backends(device):
        forwards[f"groupsort[{b}]"] = lambda b=b: F.groupsort(x, group_size, 1, backend=b)
    cases = {name: (lambda f=f: f().backward(grad)) for name, f in forwards.items()}
    moved = 5 * x.numel() * x.element_size()  # fwd: read x, write y; bwd: read g and x, write
    title = f"groupsort fwd+bwd {rows}x{cols} G={group_size} {DTYPE_NAMES[dtype]}"
    if grad_layout != "dense":
        title += f", {grad_layout} gradient"
    return Group(title, "relu", cases, forwards, dict.fromkeys(cases, moved))


def groupsort_forward_group(rows: int, cols: int, device, dtype=torch.float32) -> Group:
    """GroupSort(2) forward alone per backend vs ReLU forward (no autograd recording)."""
    torch.manual_seed(0)
    x = torch.randn(rows, cols, device=device, dtype=dtype)
    cases = {"relu": lambda: torch.relu(x)}
    for b in bench_backends(device):
        cases[f"groupsort[{b}]"] = lambda b=b: F.groupsort(x, 2, 1, backend=b)
    title = f"groupsort forward {rows}x{cols} G=2 {DTYPE_NAMES[dtype]}"
    return Group(title, "relu", cases, {}, dict.fromkeys(cases, 2 * x.numel() * x.element_size()))


def groupsort_backward_group(rows: int, cols: int, device, dtype=torch.float32) -> Group:
    """GroupSort(2) backward alone per backend vs ReLU backward: the engine run over a kept
    graph (dense upstream gradient), the forward done once outside the timing."""
    torch.manual_seed(0)
    x = torch.randn(rows, cols, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    outputs = {"relu": torch.relu(x)}
    for b in bench_backends(device):
        outputs[f"groupsort[{b}]"] = F.groupsort(x, 2, 1, backend=b)
    cases = {
        name: (lambda y=y: torch.autograd.grad(y, x, grad, retain_graph=True))
        for name, y in outputs.items()
    }
    title = f"groupsort backward {rows}x{cols} G=2 {DTYPE_NAMES[dtype]}"
    return Group(title, "relu", cases, {}, dict.fromkeys(cases, 3 * x.numel() * x.element_size()))


def power_iteration_group(n: int, device, dtype=torch.float32, n_iters: int = 1) -> Group:
    """One power-iteration step per backend vs two plain torch matvecs (the reference)."""
    torch.manual_seed(0)
    w = torch.randn(n, n, device=device, dtype=dtype)
    v = torch.randn(n, device=device, dtype=torch.float32)
    cases: dict[str, Case] = {"torch_matvec": lambda: reference.power_iteration(w, v, n_iters)}
    for b in bench_backends(device):
        cases[f"power_iteration[{b}]"] = lambda b=b: F.power_iteration(w, v, n_iters, backend=b)
    moved = n_iters * w.numel() * w.element_size()  # the ideal: one read of W per step
    steps = f"{n_iters} step" + ("s" if n_iters > 1 else "")
    title = f"power_iteration {n}x{n} {DTYPE_NAMES[dtype]} ({steps})"
    return Group(title, "torch_matvec", cases, {}, dict.fromkeys(cases, moved))


def vae_step_group(batch: int, device, hidden=(512, 512), latent: int = 10) -> Group:
    """One Adam step of the paper's VAE: LipLinear + GroupSort per backend vs nn.Linear + ReLU."""
    torch.manual_seed(0)
    x = torch.rand(batch, 784, device=device)
    models = {"standard_vae": StandardVAE(784, latent, hidden)}
    for b in bench_backends(device):
        models[f"lipschitz_vae[{b}]"] = LipschitzVAE(784, latent, hidden, 7.0, 7.0, 0.7, backend=b)
    cases, forwards = {}, {}
    for name, model in models.items():
        model.to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        forwards[name] = lambda model=model: -model.elbo(x).mean()

        def step(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            (-model.elbo(x).mean()).backward()
            opt.step()

        cases[name] = step
    title = f"vae_step Adam B={batch} 784-{'-'.join(map(str, hidden))}-{latent} fp32"
    return Group(title, "standard_vae", cases, forwards)


@functools.cache
def _trained_vae() -> LipschitzVAE:
    """The demo's Lipschitz VAE after 3 epochs on the bundled MNIST (cached per process)."""
    from crvae_ext.data import dataset
    from crvae_ext.train import TrainConfig, train

    torch.manual_seed(0)
    vae = LipschitzVAE(784, 10, lipschitz_decoder=7.0, lipschitz_mean=7.0, lipschitz_std=0.7)
    train(vae, dataset("mnist"), TrainConfig(epochs=3, lr=1e-3, progress=False), device="cpu")
    return vae.eval()


@functools.cache
def _demo_vae() -> LipschitzVAE:
    """The demo's Lipschitz VAE as ``crvae demo`` trains it (30 epochs; cached per process)."""
    from crvae_ext import RobustnessTarget
    from crvae_ext.data import dataset
    from crvae_ext.train import TrainConfig, train

    torch.manual_seed(0)
    vae = LipschitzVAE.from_target(784, 10, RobustnessTarget(0.1, 8.0, 0.5), sigma_max=0.1)
    train(vae, dataset("mnist"), TrainConfig(epochs=30, lr=1e-3, progress=False), device="cpu")
    vae.enforce_target()
    return vae.eval()


def _mnist(n: int) -> torch.Tensor:
    from crvae_ext.data import dataset

    return dataset("mnist", "test").images[:n]


def certify_group(n: int, device, batch: int = 128) -> Group:
    """certify() on n inputs in batches of ``batch`` vs encoding them in those batches: one call
    over all (the dataset-scale API) and one call per batch (a user's loop), each mode; the
    constants are cached, as after the first call of any session."""
    vae = _trained_vae().to(device)
    x = _mnist(n).to(device)
    certify(vae, x[:1], 8.0, 0.5)  # the constants: once per weight state

    def encode() -> None:
        with torch.no_grad():
            for part in x.split(batch):
                vae.encode(part)

    cases = {"encode": encode}
    for mode in ("fast", "global"):
        cases[f"certify_{mode}"] = lambda m=mode: certify(vae, x, 8.0, 0.5, mode=m,
                                                          batch_size=batch)  # fmt: skip
        cases[f"certify_{mode}_per_batch"] = lambda m=mode: [
            certify(vae, part, 8.0, 0.5, mode=m) for part in x.split(batch)
        ]
    title = f"certify {n} inputs in batches of {batch} (784-512-512-10)"
    return Group(title, "encode", cases, rounds=5, items=n)


def certify_tight_group(n: int, device) -> Group:
    """certify's mode "tight" (the decoder's local bound) on n inputs of the demo's model: its
    throughput, beside mode "fast" on the same inputs."""
    vae = _demo_vae().to(device)
    x = _mnist(n).to(device)
    certify(vae, x[:1], 8.0, 0.5)
    cases = {
        "certify_fast": lambda: certify(vae, x, 8.0, 0.5, mode="fast"),
        "certify_tight": lambda: certify(vae, x, 8.0, 0.5, mode="tight"),
    }
    return Group(f"certify tight {n} inputs (784-512-512-10)", "certify_fast", cases, rounds=3,
                 items=n)  # fmt: skip


def attack_group(n: int, radius: float, device, steps: int = 50) -> Group:
    """Batched PGD max-damage (ours) vs a per-image scipy L-BFGS-B loop like the paper's; the
    notes give the damage each reaches on the same images (equal or greater strength)."""
    from .peer_attack import lbfgsb_max_damage

    vae = _trained_vae()
    x = _mnist(n)
    cases = {
        "lbfgsb_per_image": lambda: lbfgsb_max_damage(vae.cpu(), x, radius, max_iter=steps),
        "max_damage_batched": lambda: max_damage(vae.to(device), x.to(device), radius, steps=steps),
    }
    title = f"attack |d|<={radius:g}, {n} images, {steps} iterations (time per batch)"
    damage = attack_strength(n, radius, device, steps)
    notes = {k: f"mean damage reached {v:.4f} (one common estimator)" for k, v in damage.items()}
    return Group(title, "lbfgsb_per_image", cases, notes=notes, rounds=3)


def attack_strength(n: int, radius: float, device, steps: int = 50) -> dict[str, float]:
    """Mean damage each attack reaches on the same images, judged by one common estimator."""
    from crvae_ext.attacks import expected_damage

    from .peer_attack import lbfgsb_max_damage

    vae = _trained_vae().cpu()
    x = _mnist(n)
    torch.manual_seed(1)
    deltas = {
        "lbfgsb_per_image": lbfgsb_max_damage(vae, x, radius, max_iter=steps)[0],
        "max_damage_batched": max_damage(vae, x, radius, steps=steps).delta,
    }
    torch.manual_seed(2)
    with torch.no_grad():
        return {k: float(expected_damage(vae, x, d, 512).mean()) for k, d in deltas.items()}
