"""Set prediction loss of ISTR_SPEC §3: focal + L1 + GIoU + mask (L2 on embeddings, Dice on masks).

The criterion returns UNWEIGHTED terms; :func:`weighted_sum` applies the weights, once
(DESIGN.md). The mask loss is an ablation axis (``MASK_LOSSES``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from istr.matcher import HungarianMatcher, Indices
from istr.targets import BatchTargets


def mask_l2_loss(
    codes: Tensor, target_codes: Tensor, target_masks: Tensor, codec: torch.nn.Module, num_boxes: float
) -> Tensor:
    """L2(e_p, e_g): squared error summed, / num_boxes / l (ISTR_SPEC §3, reference code)."""
    return (codes - target_codes).pow(2).sum() / num_boxes / max(codes.shape[-1], 1)


def mask_dice_loss(
    codes: Tensor, target_codes: Tensor, target_masks: Tensor, codec: torch.nn.Module, num_boxes: float
) -> Tensor:
    """Dice(decode(e_p), m_g) on masks reconstructed by the fixed decoder (ISTR_SPEC §3)."""
    probs = codec.decode(codes).sigmoid().flatten(1)
    gt = target_masks.flatten(1)
    dice = 1 - (2 * (probs * gt).sum(1) + 1) / (probs.sum(1) + gt.sum(1) + 1)
    return dice.sum() / num_boxes


MaskLoss = Callable[[Tensor, Tensor, Tensor, torch.nn.Module, float], Tensor]
MASK_TERMS: dict[str, MaskLoss] = {"loss_mask_l2": mask_l2_loss, "loss_mask_dice": mask_dice_loss}
MASK_LOSSES: dict[str, tuple[str, ...]] = {
    "l2+dice": ("loss_mask_l2", "loss_mask_dice"),
    "l2": ("loss_mask_l2",),
    "dice": ("loss_mask_dice",),
}


class SetCriterion:
    """Matches each stage anew and computes its loss terms (deep supervision, ISTR_SPEC §3)."""

    def __init__(
        self,
        matcher: HungarianMatcher,
        codec: torch.nn.Module,
        mask_loss: str = "l2+dice",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        deep_supervision: bool = True,
    ) -> None:
        if mask_loss not in MASK_LOSSES:
            raise ValueError(f"unknown mask loss {mask_loss!r}; valid: {', '.join(MASK_LOSSES)}")
        self.matcher, self.codec = matcher, codec
        self.mask_terms = MASK_LOSSES[mask_loss]
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
        for name in self.mask_terms:
            losses[name] = MASK_TERMS[name](codes, target.codes[gt_idx], target.masks[gt_idx], self.codec, n)
        return losses

    def __call__(self, outputs: dict, target: BatchTargets) -> dict[str, Tensor]:
        """Unweighted terms: final stage as ``loss_*``, earlier stage i as ``loss_*_s{i}``."""
        stages = [*outputs["aux"], outputs] if self.deep_supervision else [outputs]
        all_indices = self.matcher.match_stages(stages, target)
        losses: dict[str, Tensor] = {}
        last = len(stages) - 1
        for i, (out, indices) in enumerate(zip(stages, all_indices)):
            suffix = "" if i == last else f"_s{i}"
            losses.update({f"{k}{suffix}": v for k, v in self.stage_losses(out, target, indices).items()})
        return losses


def loss_weights(loss_cfg) -> dict[str, float]:
    """Weight per loss term name (stage suffix stripped): class 2, L1 5, GIoU 2, mask 2 (ISTR_SPEC §3)."""
    return {
        "loss_cls": loss_cfg.weight_class,
        "loss_l1": loss_cfg.weight_l1,
        "loss_giou": loss_cfg.weight_giou,
        "loss_mask_l2": loss_cfg.weight_mask,
        "loss_mask_dice": loss_cfg.weight_mask,
    }


def weighted_sum(losses: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """The ONE place loss weights are applied."""
    total = None
    for name, value in losses.items():
        term = weights[re.sub(r"_s\d+$", "", name)] * value
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no loss terms to sum")
    return total


def build_criterion(loss_cfg, matcher: HungarianMatcher, codec: torch.nn.Module) -> SetCriterion:
    return SetCriterion(
        matcher, codec, loss_cfg.mask, loss_cfg.focal_alpha, loss_cfg.focal_gamma, loss_cfg.deep_supervision
    )
