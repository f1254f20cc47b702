"""ELBO training: deterministic, resumable, and data-parallel under torchrun.

Every random draw is a function of (seed, epoch, step): the batch order comes from a
DistributedSampler (also with one process) and the reparameterisation noise of a global batch
from a generator seeded per step, each rank taking its own rows. So 2 processes see exactly the
batches and noise of 1 process, and a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from . import _checks
from ._context import eval_mode
from ._distributed import world as _world
from .checkpoint import Checkpoint, check_writable, load_checkpoint, save_checkpoint


@dataclass
class TrainConfig:
    """Optimisation settings (the paper: Adam, lr 1e-4, batch 128)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-4
    beta: float = 1.0
    seed: int = 0
    checkpoint: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        _checks.integer("epochs", self.epochs, 1)
        _checks.integer("batch_size", self.batch_size, 1)
        _checks.positive_finite("lr", self.lr)
        _checks.nonnegative_finite("beta", self.beta)
        _checks.integer("seed", self.seed, 0)


class _NegativeELBO(nn.Module):
    """Loss module so that DistributedDataParallel sees the whole training computation."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor, beta: float) -> torch.Tensor:
        return -self.vae.elbo(x, beta, eps, checked=True).mean()


def init_distributed() -> bool:
    """Join the torchrun process group (gloo on CPU, nccl on GPU) if launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_available() and dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def _step_noise(seed: int, epoch: int, step: int, rows: int, latent: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + step)
    return torch.randn(rows, latent, generator=gen)


def train(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    resume: str | Path | None = None,
    device: torch.device | str | None = None,
) -> list[float]:
    """Train ``model`` on -ELBO with Adam; returns the mean loss of every epoch.

    ``data`` yields (x, label) pairs. With ``resume``, model, optimizer and epoch come from that
    checkpoint. Under torchrun each rank takes batch_size / world_size of every global batch.
    """
    rank, world = _world()
    if config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by {world} ranks")
    _check_batches(len(data), config.batch_size, world)
    if config.checkpoint:
        check_writable(config.checkpoint)
    saved = None
    if resume is not None:
        saved = load_checkpoint(resume)
        _check_resumable(saved, model, config, resume)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    was_training = model.training
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    start, history = 0, []
    if saved is not None:
        model.load_state_dict(saved.model.state_dict())
        optimizer.load_state_dict(saved.optimizer)
        start, history = saved.epoch, list(saved.history)
    loss_module = _NegativeELBO(model)
    runner = DistributedDataParallel(loss_module) if world > 1 else loss_module
    sampler = DistributedSampler(data, world, rank, shuffle=True, seed=config.seed, drop_last=True)
    loader = DataLoader(
        data, batch_size=config.batch_size // world, sampler=sampler, drop_last=True
    )
    model.train()
    for epoch in range(start, config.epochs):
        sampler.set_epoch(epoch)
        total = torch.zeros(2, dtype=torch.float64, device=device)
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            leave=False,
            disable=not config.progress or rank != 0,
        )
        for step, (x, _) in enumerate(bar):
            model.check_data(x)  # on the host batch: no device sync
            noise = _step_noise(config.seed, epoch, step, config.batch_size, model.latent_dim)
            loss = runner(x.to(device), noise[rank::world].to(device), config.beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += torch.stack([loss.detach().double(), torch.ones((), device=device)])
            if not bar.disable:  # loss.item() waits for the device
                bar.set_postfix(loss=f"{loss.item():.2f}")
        if world > 1:
            dist.all_reduce(total)
        history.append(float(total[0] / total[1]))
        if config.checkpoint and rank == 0:
            save_checkpoint(
                config.checkpoint, model, optimizer, epoch + 1, history, dataclasses.asdict(config)
            )
    model.train(was_training)
    return history


def _check_batches(examples: int, batch_size: int, world: int) -> None:
    """Every epoch takes only full batches (for determinism across process counts): at least
    one must fit, or nothing would be trained."""
    per_rank = examples // world
    if per_rank // (batch_size // world) == 0:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {examples} training examples"
            + (f" ({per_rank} per rank on {world} ranks)" if world > 1 else "")
            + f": no full batch to train on; use a batch size <= {per_rank * world}"
        )


def _check_resumable(saved: Checkpoint, model: nn.Module, config: TrainConfig, path) -> None:
    """Resuming continues the same model with the settings the run started with, for more
    epochs than the checkpoint holds (it is deterministic only then)."""
    ours = {k: v for k, v in model.config.items() if k in saved.model.config and k != "backend"}
    theirs = {k: v for k, v in saved.model.config.items() if k != "backend"}
    if type(saved.model) is not type(model) or ours != theirs:
        raise ValueError(
            f"cannot resume from {path}: it holds a {type(saved.model).__name__} with "
            f"{saved.model.config}, not this {type(model).__name__}; build the model from the "
            "checkpoint (crvae_ext.checkpoint.load_checkpoint(path).model)"
        )
    if saved.optimizer is None:
        raise ValueError(
            f"cannot resume from {path}: it holds no optimizer state (it was saved without "
            "one); start a new run from its weights instead"
        )
    if config.epochs <= saved.epoch:
        raise ValueError(
            f"cannot resume from {path}: it has already trained {saved.epoch} epochs and "
            f"epochs={config.epochs} asks for no more; ask for more than {saved.epoch}"
        )
    keep = ("batch_size", "lr", "beta", "seed")
    settings = saved.train_config
    changed = [k for k in keep if k in settings and settings[k] != getattr(config, k)]
    if changed:
        diffs = ", ".join(f"{k}: {settings[k]} -> {getattr(config, k)}" for k in changed)
        raise ValueError(f"cannot resume with different settings ({diffs})")


def evaluate_elbo(model: nn.Module, data: Dataset, batch_size: int = 500, seed: int = 0) -> float:
    """Mean per-example ELBO over ``data`` (eval mode, fixed noise)."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with eval_mode(model), torch.no_grad():
        for x, _ in DataLoader(data, batch_size=batch_size):
            eps = torch.randn(x.shape[0], model.latent_dim, generator=gen).to(device)
            total += float(model.elbo(x.to(device), 1.0, eps).sum())
            count += x.shape[0]
    return total / count
