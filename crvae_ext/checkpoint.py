"""Checkpoints that round-trip exactly: model class, constructor config, state, optimizer."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .certify import LipschitzConstants, RobustnessTarget
from .vae import LipschitzVAE, StandardVAE

FORMAT = "crvae_ext-checkpoint-1"
_MODELS = {"LipschitzVAE": LipschitzVAE, "StandardVAE": StandardVAE}


class Checkpoint(NamedTuple):
    """A loaded checkpoint: the rebuilt model and the training state saved beside it."""

    model: nn.Module
    optimizer: dict[str, Any] | None
    epoch: int
    history: list[float]
    train_config: dict[str, Any]


def model_record(model: nn.Module) -> dict[str, Any]:
    """What rebuilds ``model``: its class name, constructor config, budgets and target."""
    name = type(model).__name__
    if name not in _MODELS:
        raise TypeError(f"cannot checkpoint {name}: one of {sorted(_MODELS)} is needed")
    target = getattr(model, "target", None)
    dtype = next(model.parameters()).dtype
    return {
        "class": name,
        "config": dict(model.config),
        "dtype": str(dtype).removeprefix("torch."),
        "budgets": list(getattr(model, "budgets", ()) or ()),
        "target": dataclasses.asdict(target) if target is not None else None,
    }


def build_model(record: dict[str, Any]) -> nn.Module:
    """The model a ``model_record`` describes, with fresh parameters."""
    if record.get("class") not in _MODELS:
        raise ValueError(f"unknown model class in checkpoint: {record.get('class')!r}")
    model = _MODELS[record["class"]](**record["config"])
    model.to(getattr(torch, record.get("dtype", "float32")))
    if record.get("budgets"):
        model.budgets = LipschitzConstants(*record["budgets"])
    if record.get("target"):
        model.target = RobustnessTarget(**record["target"])
    return model


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int = 0,
    history: list[float] | None = None,
    train_config: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint (atomically: a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "model": model_record(model),
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": epoch,
        "history": list(history or []),
        "train_config": dict(train_config or {}),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint`` (weights_only: no code is run)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a crvae_ext checkpoint")
    model = build_model(state["model"]).to(map_location)
    model.load_state_dict(state["state_dict"])
    return Checkpoint(
        model, state["optimizer"], state["epoch"], state["history"], state["train_config"]
    )
