"""One optimisation step (docs/architecture.md#data-flow): targets -> forward -> matcher + criterion -> backward ->
grad-norm clip -> AdamW + schedule step.

The parts of the step are functions of their own so that ``istr bench``'s phase timing (istr/bench/phases.py)
runs the very calls a training step runs, one timed phase each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from istr.codecs import MaskCodec
from istr.engine import dist as D
from istr.engine.precision import autocast
from istr.losses import SetCriterion, split_stage, weighted_sum
from istr.targets import prepare_targets


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainState:
    """Everything a training step touches."""

    model: torch.nn.Module
    codec: MaskCodec
    criterion: SetCriterion
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    weights: dict[str, float]
    device: torch.device
    amp: bool
    clip_grad_norm: float


def forward(state: TrainState, images: torch.Tensor, image_sizes: torch.Tensor) -> dict:
    """The model's outputs, under the step's bf16 autocast when ``state.amp`` (istr/engine/precision.py)."""
    with autocast(state.device, state.amp):
        return state.model(images, image_sizes)


def weighted_loss(state: TrainState, outputs: dict, targets: list[dict]) -> tuple[torch.Tensor, dict]:
    """(the weighted loss, its unweighted terms): matcher + criterion, then ``weighted_sum`` (docs/method.md#loss)."""
    losses = state.criterion(outputs, targets)
    return weighted_sum(losses, state.weights), losses


def backward(state: TrainState, loss: torch.Tensor) -> None:
    """Fresh gradients of ``loss`` (the previous step's are dropped, not accumulated)."""
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()


def optimizer_step(state: TrainState) -> torch.Tensor:
    """Clip the gradient norm, step AdamW and the lr schedule (docs/method.md#training); the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), state.clip_grad_norm)
    state.optimizer.step()
    state.scheduler.step()
    return grad_norm


def train_step(state: TrainState, batch: dict) -> dict[str, float]:
    """One optimisation step; returns the (rank-averaged) weighted loss and its terms."""
    device = state.device
    images = batch["images"].to(device, non_blocking=True)
    image_sizes = batch["image_sizes"].to(device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    targets = prepare_targets(batch["targets"], image_sizes, state.codec, device)
    outputs = forward(state, images, image_sizes)
    loss, losses = weighted_loss(state, outputs, targets)
    # Every rank must agree on skipping, so the finiteness check uses the all-reduced loss.
    reduced = D.all_reduce_mean(loss.detach())
    if not torch.isfinite(reduced):
        raise NonFiniteLossError(
            f"non-finite loss {reduced.item()} (terms: { {k: round(v.item(), 4) for k, v in losses.items()} })"
        )
    backward(state, loss)
    grad_norm = optimizer_step(state)
    metrics = {k: v.item() for k, v in losses.items() if split_stage(k)[1] is None}
    metrics.update(loss=reduced.item(), grad_norm=float(grad_norm), lr=state.optimizer.param_groups[0]["lr"])
    return metrics
