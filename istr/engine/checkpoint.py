"""Checkpoints: written atomically, loaded for ``--resume`` (docs/architecture.md#results).

While a run trains, ``checkpoints/last.pt`` holds the model, optimizer and scheduler state and the step.
A finished run keeps the model weights and the step only (an AdamW state is twice the weights), unless
``train.keep_optimizer_state``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from istr.io import atomic_torch_save

TRAINING_STATE = ("optimizer", "scheduler")  # what a weights-only checkpoint lacks


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or lacks what the caller needs; the message names the file."""


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> None:
    """``path`` <- the model's weights, the step and, where given, the optimizer and scheduler state, atomically
    (a crash keeps the old file)."""
    state = {"model": model.state_dict(), "step": step}
    if optimizer is not None:
        state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
    atomic_torch_save(path, state)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint at ``path``; a missing file is FileNotFoundError, an unreadable one :class:`CheckpointError`."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train first or drop --resume")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 - torch.load raises many kinds for a truncated or foreign file
        reason = (str(err).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: {reason})") from None
    if not isinstance(checkpoint, dict) or not {"model", "step"} <= set(checkpoint):
        raise CheckpointError(f"{path} is not a checkpoint of this project (it lacks 'model' or 'step')")
    return checkpoint


def has_training_state(checkpoint: dict) -> bool:
    return all(key in checkpoint for key in TRAINING_STATE)


def resumable_checkpoint(path: Path, max_steps: int) -> dict:
    """The checkpoint ``--resume`` continues from, read and checked before anything is written.

    A finished run's weights-only checkpoint can be resumed only to evaluate it again (its step is
    ``max_steps``): training on needs the optimizer state (``train.keep_optimizer_state``).
    """
    checkpoint = load_checkpoint(path)
    if checkpoint["step"] < max_steps and not has_training_state(checkpoint):
        raise CheckpointError(
            f"{path} holds a finished run's weights only (step {checkpoint['step']}), not its optimizer state, "
            f"so it cannot train on to train.max_steps={max_steps}; start a new run, or set "
            "train.keep_optimizer_state=true for runs you will extend"
        )
    return checkpoint
