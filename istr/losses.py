"""Set prediction loss of docs/method.md#loss: focal + L1 + GIoU + mask (L2 on embeddings, Dice on masks).

The criterion returns UNWEIGHTED terms; :func:`weighted_sum` applies the weights, once. The mask
loss is an ablation axis (``MASK_LOSSES``; a new arm: docs/adding-an-arm.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from istr.matcher import HungarianMatcher, Indices
from istr.registry import pick
from istr.targets import BatchTargets


def mask_l2_loss(
    codes: Tensor, target_codes: Tensor, target_masks: Tensor, codec: torch.nn.Module, num_boxes: float
) -> Tensor:
    """L2(e_p, e_g): squared error summed, / num_boxes / l (docs/method.md#loss, reference code)."""
    return (codes - target_codes).pow(2).sum() / num_boxes / max(codes.shape[-1], 1)


def mask_dice_loss(
    codes: Tensor, target_codes: Tensor, target_masks: Tensor, codec: torch.nn.Module, num_boxes: float
) -> Tensor:
    """Dice(decode(e_p), m_g) on masks reconstructed by the fixed decoder (docs/method.md#loss)."""
    probs = codec.decode(codes).sigmoid().flatten(1)
    gt = target_masks.flatten(1)
    dice = 1 - (2 * (probs * gt).sum(1) + 1) / (probs.sum(1) + gt.sum(1) + 1)
    return dice.sum() / num_boxes


MaskLoss = Callable[[Tensor, Tensor, Tensor, torch.nn.Module, float], Tensor]


@dataclass(frozen=True)
class MaskTerm:
    """One logged mask loss term: the function computing it and the ``LossConfig`` field holding its weight."""

    fn: MaskLoss
    weight_key: str = "weight_mask"


# The ablation axis ``loss.mask``: arm name -> its terms, term name -> MaskTerm (docs/adding-an-arm.md).
MASK_LOSSES: dict[str, dict[str, MaskTerm]] = {
    "l2+dice": {"loss_mask_l2": MaskTerm(mask_l2_loss), "loss_mask_dice": MaskTerm(mask_dice_loss)},
    "l2": {"loss_mask_l2": MaskTerm(mask_l2_loss)},
    "dice": {"loss_mask_dice": MaskTerm(mask_dice_loss)},
}
BOX_WEIGHT_KEYS = {"loss_cls": "weight_class", "loss_l1": "weight_l1", "loss_giou": "weight_giou"}
_STAGE_SUFFIX = re.compile(r"_s(\d+)$")


def stage_name(term: str, stage: int, num_stages: int) -> str:
    """The logged name of ``term`` at ``stage``: the final stage keeps ``term``, stage i < last gets ``_s{i}``."""
    return term if stage == num_stages - 1 else f"{term}_s{stage}"


def split_stage(name: str) -> tuple[str, int | None]:
    """Inverse of :func:`stage_name`: (term, stage index), stage None for the final stage."""
    match = _STAGE_SUFFIX.search(name)
    return (name, None) if match is None else (name[: match.start()], int(match.group(1)))


class SetCriterion:
    """Matches each stage anew and computes its loss terms (deep supervision, docs/method.md#loss)."""

    def __init__(
        self,
        matcher: HungarianMatcher,
        codec: torch.nn.Module,
        mask_loss: str = "l2+dice",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        deep_supervision: bool = True,
    ) -> None:
        self.matcher, self.codec = matcher, codec
        self.mask_terms = pick(MASK_LOSSES, mask_loss, "loss.mask")
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.deep_supervision = deep_supervision

    def stage_losses(self, out: dict, target: BatchTargets, indices: Indices) -> dict[str, Tensor]:
        logits = out["logits"].float()
        batch_idx = torch.cat([torch.full_like(p, b) for b, (p, _) in enumerate(indices)]).to(logits.device)
        pred_idx = torch.cat([p for p, _ in indices]).to(logits.device)
        offsets = torch.tensor([0, *target.sizes[:-1]]).cumsum(0)
        gt_idx = torch.cat([g + offsets[b] for b, (_, g) in enumerate(indices)]).to(logits.device)

        onehot = torch.zeros_like(logits)
        onehot[batch_idx, pred_idx, target.labels[gt_idx]] = 1.0
        n = target.num_boxes
        pred_boxes = out["boxes"][batch_idx, pred_idx].float()
        pred_norm = pred_boxes / target.image_scale[batch_idx]
        codes = out["codes"][batch_idx, pred_idx].float()
        losses = {
            "loss_cls": sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma, reduction="sum") / n,
            "loss_l1": (pred_norm - target.boxes_norm[gt_idx]).abs().sum() / n,
            "loss_giou": generalized_box_iou_loss(pred_boxes, target.boxes[gt_idx], reduction="sum") / n,
        }
        for name, term in self.mask_terms.items():
            losses[name] = term.fn(codes, target.codes[gt_idx], target.masks[gt_idx], self.codec, n)
        return losses

    def __call__(self, outputs: dict, target: BatchTargets) -> dict[str, Tensor]:
        """Unweighted terms: final stage as ``loss_*``, earlier stage i as ``loss_*_s{i}``."""
        stages = [*outputs["aux"], outputs] if self.deep_supervision else [outputs]
        all_indices = self.matcher.match_stages(stages, target)
        losses: dict[str, Tensor] = {}
        for i, (out, indices) in enumerate(zip(stages, all_indices)):
            terms = self.stage_losses(out, target, indices)
            losses.update({stage_name(k, i, len(stages)): v for k, v in terms.items()})
        return losses


def loss_weights(loss_cfg) -> dict[str, float]:
    """Weight per loss term name (stage suffix stripped): class 2, L1 5, GIoU 2, mask 2 (docs/method.md#loss)."""
    keys = dict(BOX_WEIGHT_KEYS)
    for terms in MASK_LOSSES.values():
        keys.update({name: term.weight_key for name, term in terms.items()})
    return {name: float(getattr(loss_cfg, key)) for name, key in keys.items()}


def weighted_sum(losses: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """The ONE place loss weights are applied."""
    total = None
    for name, value in losses.items():
        term = weights[split_stage(name)[0]] * value
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no loss terms to sum")
    return total


def build_criterion(loss_cfg, matcher: HungarianMatcher, codec: torch.nn.Module) -> SetCriterion:
    return SetCriterion(
        matcher, codec, loss_cfg.mask, loss_cfg.focal_alpha, loss_cfg.focal_gamma, loss_cfg.deep_supervision
    )
