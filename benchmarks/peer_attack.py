"""The paper code's way to attack: scipy L-BFGS-B, one image at a time, on the CPU.

The peer baseline of the attack benchmark: the maximum-damage objective with fixed sampling
noise (quasi-Newton methods need a deterministic objective), the perturbation kept feasible by
the same box-then-ball map as ``crvae_ext.attacks.project``, gradients from autograd.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import optimize

from crvae_ext._context import eval_mode, frozen
from crvae_ext.attacks import project

_BOX = (0.0, 1.0)


def _attack_one(vae, row: torch.Tensor, radius: float, samples: int, max_iter: int):
    """L-BFGS-B on one (1, D) image: (feasible delta, damage reached)."""
    noise = torch.randn(2, samples, vae.latent_dim, dtype=row.dtype)
    bound = torch.full((1, 1), radius, dtype=row.dtype)
    with torch.no_grad():
        mu, sigma = vae.encode(row)
        clean = vae.decode(mu + sigma * noise[0])

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        w_t = torch.tensor(w, dtype=row.dtype).view_as(row).requires_grad_(True)
        mu2, sigma2 = vae.encode(row + project(row, w_t, bound, _BOX))
        damage = (vae.decode(mu2 + sigma2 * noise[1]) - clean).norm(dim=1).mean()
        (grad,) = torch.autograd.grad(-damage, w_t)
        return -float(damage.detach()), grad.double().flatten().numpy()

    start = (radius * torch.randn_like(row) / row.numel() ** 0.5).double().flatten().numpy()
    best = optimize.minimize(
        objective, start, jac=True, method="L-BFGS-B", options={"maxiter": max_iter}
    )
    w = torch.tensor(best.x, dtype=row.dtype).view_as(row)
    return project(row, w, bound, _BOX), -best.fun


def lbfgsb_max_damage(
    vae, x: torch.Tensor, radius: float, samples: int = 8, max_iter: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image L-BFGS-B on E|g(z_{x+d}) - g(z_x)| (fixed noise); (deltas, damages)."""
    with eval_mode(vae), frozen(vae):
        results = [_attack_one(vae, row.unsqueeze(0), radius, samples, max_iter) for row in x]
    deltas, damages = zip(*results, strict=True)
    return torch.cat(deltas), torch.tensor(damages)
