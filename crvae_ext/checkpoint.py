"""Checkpoints that round-trip exactly: model class, constructor config, state, optimizer."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from . import _checks
from .certify import LipschitzConstants, RobustnessTarget
from .vae import ConvLipschitzVAE, LipschitzVAE, StandardVAE

FORMAT = "crvae_ext-checkpoint-1"
_MODELS = {
    "ConvLipschitzVAE": ConvLipschitzVAE,
    "LipschitzVAE": LipschitzVAE,
    "StandardVAE": StandardVAE,
}
# The backend is a property of the machine that runs a model, not of the model: never saved,
# and ignored in checkpoints that recorded it.
_MACHINE_KEYS = ("backend",)
_TMP_SUFFIX = ".tmp"


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
    config = {k: v for k, v in model.config.items() if k not in _MACHINE_KEYS}
    return {
        "class": name,
        "config": config,
        "dtype": str(dtype).removeprefix("torch."),
        "budgets": list(getattr(model, "budgets", ()) or ()),
        "target": dataclasses.asdict(target) if target is not None else None,
    }


def build_model(record: dict[str, Any]) -> nn.Module:
    """The model a ``model_record`` describes, with fresh parameters."""
    if not isinstance(record, dict) or record.get("class") not in _MODELS:
        name = record.get("class") if isinstance(record, dict) else None
        raise ValueError(f"unknown model class in checkpoint: {name!r} (known: {sorted(_MODELS)})")
    cls = _MODELS[record["class"]]
    config = {k: v for k, v in dict(record.get("config") or {}).items() if k not in _MACHINE_KEYS}
    try:
        model = cls(**config)
        dtype = getattr(torch, str(record.get("dtype", "float32")))
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype {record.get('dtype')!r} is not a floating-point dtype")
        model.to(dtype)
        if record.get("budgets"):
            model.budgets = LipschitzConstants(*record["budgets"])
        if record.get("target"):
            model.target = RobustnessTarget(**record["target"])
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(
            f"the checkpoint's model record does not build a {record['class']} of this version "
            f"of crvae_ext ({exc})"
        ) from None
    return model


def check_writable(path: str | Path, what: str = "checkpoint") -> Path:
    """Refuse, before any long work, an output file path that cannot be written: a directory,
    a parent that is a file, or a folder without write permission. Creates missing parents."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} path {path} is a directory: name a file inside it")
    check_folder(path.parent, f"{what} path {path}")
    return path


def check_folder(folder: Path, what: str) -> Path:
    """Create ``folder`` (and its parents) where missing and check that a file can be written
    in it; ``what`` starts each error message."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{what}: {folder} or a parent of it is a file, not a folder") from None
    except OSError as exc:
        raise ValueError(f"{what}: cannot create {folder} ({exc.strerror})") from None
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ValueError(f"{what}: cannot write in {folder} ({exc.strerror})") from None
    return folder


def _write_atomically(path: Path, state: dict[str, Any]) -> None:
    """torch.save to ``path + .tmp``, flushed to disk, then renamed over ``path``: a crash
    leaves the old file intact. A temporary left by a killed save is replaced on the next one,
    and removed if this save fails."""
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | dict[str, Any] | None = None,
    epoch: int = 0,
    history: list[float] | None = None,
    train_config: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically. ``optimizer`` may be an optimizer or its state dict."""
    path = check_writable(path)
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.state_dict()
    state = {
        "format": FORMAT,
        "model": model_record(model),
        "state_dict": model.state_dict(),
        "optimizer": optimizer,
        "epoch": epoch,
        "history": list(history or []),
        "train_config": dict(train_config or {}),
    }
    _write_atomically(path, state)
    return path


def update_model(path: str | Path, model: nn.Module) -> Path:
    """Replace the model in an existing checkpoint, keeping its optimizer state, epoch, history
    and training settings (so that it stays resumable), e.g. after ``enforce_target``."""
    saved = _read(Path(path))
    return save_checkpoint(path, model, saved["optimizer"], saved["epoch"], saved["history"],
                           saved["train_config"])  # fmt: skip


_KEYS = {"model": dict, "state_dict": dict, "epoch": int, "history": list, "train_config": dict}


def _read(path: Path) -> dict[str, Any]:
    """The checked contents of a checkpoint file (weights_only: no code is run)."""
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not path.is_file():
        raise ValueError(f"checkpoint path {path} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # arbitrary bytes fail in arbitrary ways inside torch.load
        summary = _checks.one_line(exc, 200)
        if "weights_only" in summary or "Unsupported global" in summary:
            summary = "it holds pickled objects other than tensors and plain data"
        raise ValueError(
            f"{path} is not a crvae_ext checkpoint (it could not be read: {summary}); "
            "checkpoints are written by 'crvae train' or crvae_ext.checkpoint.save_checkpoint"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a crvae_ext checkpoint (no '{FORMAT}' format marker); checkpoints "
            "are written by 'crvae train' or crvae_ext.checkpoint.save_checkpoint"
        )
    for key, kind in _KEYS.items():
        if not isinstance(state.get(key), kind):
            raise ValueError(f"{path} is a damaged crvae_ext checkpoint: '{key}' is missing")
    if state.get("optimizer") is not None and not isinstance(state["optimizer"], dict):
        raise ValueError(f"{path} is a damaged crvae_ext checkpoint: bad optimizer state")
    return state


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint`` (weights_only: no code is run)."""
    path = Path(path)
    state = _read(path)
    try:
        model = build_model(state["model"])
        model.load_state_dict(state["state_dict"])
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: {_checks.one_line(exc, 300)}") from None
    model.to(map_location)
    return Checkpoint(
        model, state["optimizer"], state["epoch"], state["history"], state["train_config"]
    )
