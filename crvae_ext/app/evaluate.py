"""Evaluate a trained VAE the way the paper does: ELBO, certificates, attacks, margins."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import radius as radius_math
from ..attacks import empirical_margin, max_damage
from ..certify import LipschitzConstants, a_priori_radius, certify, robustness_probability
from ..train import evaluate_elbo


@dataclass
class EvalSettings:
    """How much of the test set each measurement uses, and the attack strength."""

    r: float = 8.0
    p: float = 0.5
    attack_radii: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    n_certify: int = 1000
    n_tight: int = 200  # inputs certified in mode "tight" too (the costly one)
    n_attack: int = 100
    n_margin: int = 50
    attack_steps: int = 50
    attack_samples: int = 8
    mc_samples: int = 256
    margin_bisection: int = 10


@dataclass
class Evaluation:
    """Everything one model's row of the report needs (tensors are per input)."""

    name: str
    test_elbo: float
    constants: LipschitzConstants
    a_priori: float | None
    certified: torch.Tensor  # per input, mode "fast" (the default)
    paper: torch.Tensor | None
    certified_global: torch.Tensor | None = None  # per input with the model's (a, b, c)
    certified_tight: torch.Tensor | None = None  # per input, mode "tight" (first n_tight)
    damage: dict[float, torch.Tensor] = field(default_factory=dict)
    robust_probability: dict[float, torch.Tensor] = field(default_factory=dict)
    margin: torch.Tensor | None = None
    margin_certified: torch.Tensor | None = None

    @property
    def violations(self) -> int:
        """Inputs whose certified radius (the largest mode computed) exceeds the empirical
        margin: must be 0."""
        if self.margin is None:
            return 0
        return int((self.margin_certified > self.margin).sum())


def evaluate(name: str, model: nn.Module, test: Dataset, settings: EvalSettings) -> Evaluation:
    """Certify, attack and probe ``model`` on the first inputs of ``test``."""
    images = test.images
    cert = certify(model, images[: settings.n_certify], settings.r, settings.p)
    plain = certify(model, images[: settings.n_certify], settings.r, settings.p, mode="global")
    sigma_max = getattr(model, "sigma_max", None)
    prior = a_priori_radius(model, settings.r, settings.p) if sigma_max else None
    paper = None
    if settings.p == 0.5:
        paper = radius_math.radii(
            *cert.constants,
            cert.sigma_l2,
            cert.sigma_inf,
            settings.r,
            0.5,
            model.latent_dim,
            "paper",
        ).radius
    elbo = evaluate_elbo(model, test)
    result = Evaluation(name, elbo, cert.constants, prior, cert.radius, paper, plain.radius)
    if settings.n_tight:
        tight = certify(model, images[: settings.n_tight], settings.r, settings.p, mode="tight")
        result.certified_tight = tight.radius
    x = images[: settings.n_attack]
    for attack_radius in settings.attack_radii:
        attack = max_damage(
            model, x, attack_radius, settings.attack_steps, 1, settings.attack_samples
        )
        result.damage[attack_radius] = attack.objective.detach()
        result.robust_probability[attack_radius] = robustness_probability(
            model, x, attack.delta, settings.r, settings.mc_samples
        ).estimate
    if settings.n_margin:
        subset = images[: settings.n_margin]
        margin = empirical_margin(
            model,
            subset,
            settings.r,
            settings.p,
            bisection_steps=settings.margin_bisection,
            n_samples=settings.mc_samples,
        )
        result.margin = margin.margin.cpu()
        best = cert.radius[: settings.n_margin].clone()
        if result.certified_tight is not None:
            known = min(len(result.certified_tight), len(best))
            best[:known] = torch.maximum(best[:known], result.certified_tight[:known])
        result.margin_certified = best
    return result


def report_table(results: list[Evaluation], settings: EvalSettings) -> str:
    """One markdown table: a row per model."""
    radii = settings.attack_radii
    head = [
        "model",
        "test ELBO",
        "(a, b, c)",
        "a-priori radius",
        "per-input, model's (a, b, c) (median)",
        "per-input, fast (median)",
        "per-input, tight (median)",
        "paper formula (median)",
        "empirical margin (median)",
        *(f"damage @{t:g}" for t in radii),
        "violations",
    ]
    rows = []
    for res in results:
        row = [
            res.name,
            f"{res.test_elbo:.1f}",
            "(" + ", ".join(f"{c:.3g}" for c in res.constants) + ")",
            "-" if res.a_priori is None else f"{res.a_priori:.4g}",
            median_text(res.certified_global),
            median_text(res.certified),
            median_text(res.certified_tight),
            median_text(res.paper),
            median_text(res.margin),
            *(f"{float(res.damage[t].mean()):.3f}" for t in radii),
            str(res.violations),
        ]
        rows.append(row)
    return markdown_table(head, rows)


def median_text(values: torch.Tensor | None) -> str:
    """The median of per-input values for a table, "-" where there are none."""
    return "-" if values is None else f"{float(values.double().median()):.4g}"


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table of string cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
