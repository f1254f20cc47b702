"""PNG figures of the demo and the sweep (matplotlib, the ``plot`` extra, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .._context import eval_mode
from ..attacks import max_damage
from .evaluate import EvalSettings, Evaluation


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("figures need matplotlib: pip install 'crvae-ext[plot]'") from exc
    return plt


def _save(plt, fig, path: Path, legend_ax=None) -> Path:
    """Legend (if asked), tight layout, write the PNG, free the figure."""
    if legend_ax is not None:
        legend_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reconstructions(
    models: dict[str, nn.Module],
    x: torch.Tensor,
    radius: float,
    image_shape: tuple[int, int],
    path: Path,
) -> Path:
    """Per model: input, reconstruction, max-damage attacked input and its reconstruction."""
    plt = _pyplot()
    rows = ["input", "reconstruction", f"attacked |d|={radius:g}", "reconstruction of attacked"]
    fig, axes = plt.subplots(
        len(rows) * len(models), len(x), figsize=(1.2 * len(x), 1.25 * len(rows) * len(models))
    )
    for m, (name, model) in enumerate(models.items()):
        delta = max_damage(model, x, radius, steps=50).delta
        with eval_mode(model), torch.no_grad():
            images = [
                x,
                model.decode(model.encode(x)[0]),
                (x + delta).clamp(0, 1),
                model.decode(model.encode(x + delta)[0]),
            ]
        for i, label in enumerate(rows):
            for j in range(len(x)):
                ax = axes[m * len(rows) + i, j]
                ax.imshow(images[i][j].view(image_shape).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
            axes[m * len(rows) + i, 0].set_ylabel(f"{name}\n{label}", fontsize=6)
    return _save(plt, fig, path)


def robustness_curve(results: list[Evaluation], settings: EvalSettings, path: Path) -> Path:
    """Mean Monte-Carlo P(|Delta| <= r) against the max-damage attack norm, per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    radii = [0.0, *settings.attack_radii]
    for res in results:
        probs = [1.0] + [float(res.robust_probability[t].mean()) for t in settings.attack_radii]
        ax.plot(radii, probs, marker="o", label=res.name)
        if res.a_priori:
            ax.axvline(res.a_priori, ls=":", color="gray", label=f"{res.name} a-priori radius")
    ax.axhline(settings.p, ls="--", color="k", lw=0.8, label=f"p = {settings.p:g}")
    ax.set_xlabel("attack norm |d|_2")
    ax.set_ylabel(f"P(|Delta| <= {settings.r:g})")
    return _save(plt, fig, path, ax)


def margin_scatter(results: list[Evaluation], path: Path) -> Path:
    """Certified radius against empirical margin per input; sound points lie on or below y=x."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    finite = []
    for res in results:
        if res.margin is None:
            continue
        keep = torch.isfinite(res.margin) & (res.margin > 0)
        cert = res.margin_certified[keep]
        label = res.name + (" (radius 0 drawn at 1e-4)" if bool((cert == 0).any()) else "")
        ax.scatter(res.margin[keep].numpy(), cert.clamp_min(1e-4).numpy(), s=10, label=label)
        finite.append(res.margin[keep])
    top = float(torch.cat(finite).max()) if finite and torch.cat(finite).numel() else 1.0
    ax.plot([1e-4, top], [1e-4, top], "k--", lw=0.8, label="certified = margin")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("empirical margin (attack)")
    ax.set_ylabel("certified radius")
    return _save(plt, fig, path, ax)


def sweep_radii(lipschitz, results: list[Evaluation], settings, path: Path) -> Path:
    """Certified radius against L: the paper's formula, ours (a priori, per input), margins."""
    from ..certify import certified_radius

    plt = _pyplot()
    ev, cap, m = settings.evaluation, settings.sigma_max, settings.latent_dim
    paper = [float(certified_radius(v, v, v, cap, cap, ev.r, 0.5, m, "paper")) for v in lipschitz]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(lipschitz, paper, marker="o", label="paper formula, a = b = c = L")
    ax.plot(lipschitz, [r.a_priori for r in results], marker="s", label="ours, a priori (exact)")
    ax.plot(
        lipschitz,
        [float(r.certified.median()) for r in results],
        marker="^",
        label="ours, per input (median)",
    )
    margins = [float(r.margin.median()) if r.margin is not None else float("nan") for r in results]
    ax.plot(lipschitz, margins, marker="x", ls="--", label="empirical margin (median)")
    if not any(math.isfinite(value) for value in margins):
        ax.text(
            0.02,
            0.02,
            "empirical margins: inf for every L (no attack inside the pixel box\n"
            "drove P(|Delta| <= r) below p)",
            transform=ax.transAxes,
            fontsize=7,
        )
    ax.set_yscale("log")
    ax.set_xlabel("L")
    ax.set_ylabel("radius (l2, pixels in [0, 1])")
    return _save(plt, fig, path, ax)
