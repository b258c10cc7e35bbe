"""Checkpoints: written atomically, loaded for ``--resume`` (docs/architecture.md#results)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from istr.io import atomic_torch_save


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
) -> None:
    """``path`` <- model, optimizer and scheduler state and the step, atomically (a crash keeps the old file)."""
    atomic_torch_save(
        path,
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
        },
    )


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train first or drop --resume")
    return torch.load(path, map_location=map_location, weights_only=False)
