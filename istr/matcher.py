"""Hungarian matching of docs/method.md#matching-cost, modelled on DETR's matcher.

Pairwise cost functions ``cost(pred, target, codec) -> [N, M]`` over flattened predictions and
concatenated targets; the mask term is an ablation axis (``MASK_COSTS``). All stages and images of
a batch are costed in one tensor op with one device->host copy before scipy's assignment.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import generalized_box_iou

from istr.registry import pick
from istr.targets import BatchTargets

Pred = dict[str, Tensor]
CostFn = Callable[[Pred, BatchTargets, torch.nn.Module], Tensor]


def focal_class_cost(pred: Pred, target: BatchTargets, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """C_cls: focal-style cost on the GT class probability (docs/method.md#matching-cost, as Sparse R-CNN)."""
    prob = pred["logits"].sigmoid()
    neg = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    return pos[:, target.labels] - neg[:, target.labels]


def l1_box_cost(pred: Pred, target: BatchTargets) -> Tensor:
    """C_L1 between image-size-normalised x1y1x2y2 boxes."""
    return torch.cdist(pred["boxes_norm"], target.boxes_norm, p=1)


def giou_box_cost(pred: Pred, target: BatchTargets) -> Tensor:
    """C_giou = -GIoU."""
    return -generalized_box_iou(pred["boxes"], target.boxes)


def cosine_mask_cost(pred: Pred, target: BatchTargets, codec: torch.nn.Module) -> Tensor:
    """Eq. (mask cost): 1 - (s+1)/2 with s the cosine of L2-normalised embeddings (docs/method.md#matching-cost)."""
    similarity = F.normalize(pred["codes"], dim=-1) @ F.normalize(target.codes, dim=-1).T
    return 1 - (similarity + 1) / 2


def l2_mask_cost(pred: Pred, target: BatchTargets, codec: torch.nn.Module) -> Tensor:
    """Euclidean distance between predicted and GT embeddings (ablation arm)."""
    return torch.cdist(pred["codes"], target.codes, p=2)


def dice_mask_cost(pred: Pred, target: BatchTargets, codec: torch.nn.Module) -> Tensor:
    """1 - Dice between decoded predicted masks and GT box crops (ablation arm)."""
    probs = codec.decode(pred["codes"]).sigmoid().flatten(1)
    gt = target.masks.flatten(1)
    numerator = 2 * probs @ gt.T
    denominator = probs.sum(1)[:, None] + gt.sum(1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def no_mask_cost(pred: Pred, target: BatchTargets, codec: torch.nn.Module) -> Tensor:
    """No mask term in the matching cost (ablation arm)."""
    return pred["codes"].new_zeros((pred["codes"].shape[0], target.codes.shape[0]))


MASK_COSTS: dict[str, CostFn] = {
    "cosine": cosine_mask_cost,
    "l2": l2_mask_cost,
    "dice": dice_mask_cost,
    "none": no_mask_cost,
}

Indices = list[tuple[Tensor, Tensor]]


class HungarianMatcher:
    """C = l_cls C_cls + l_L1 C_L1 + l_giou C_giou + l_mask C_mask, one-to-one per image (docs/method.md)."""

    def __init__(
        self,
        codec: torch.nn.Module,
        mask_cost: str = "cosine",
        cost_class: float = 2.0,
        cost_l1: float = 5.0,
        cost_giou: float = 2.0,
        cost_mask: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        self.codec, self.mask_cost = codec, pick(MASK_COSTS, mask_cost, "matcher.mask_cost")
        self.cost_class, self.cost_l1, self.cost_giou, self.cost_mask = cost_class, cost_l1, cost_giou, cost_mask
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def cost_matrix(self, pred: Pred, target: BatchTargets) -> Tensor:
        """Weighted total cost [N, M] for flat predictions vs all targets of the batch."""
        cost = self.cost_class * focal_class_cost(pred, target, self.focal_alpha, self.focal_gamma)
        cost = cost + self.cost_l1 * l1_box_cost(pred, target) + self.cost_giou * giou_box_cost(pred, target)
        if self.cost_mask:
            cost = cost + self.cost_mask * self.mask_cost(pred, target, self.codec)
        return cost

    @torch.no_grad()
    def match_stages(self, stage_outputs: list[dict], target: BatchTargets) -> list[Indices]:
        """Match every stage of every image; returns per stage a list of (pred_idx, gt_idx) per image."""
        logits = torch.stack([o["logits"] for o in stage_outputs]).float()  # [S,B,k,C]
        boxes = torch.stack([o["boxes"] for o in stage_outputs]).float()
        codes = torch.stack([o["codes"] for o in stage_outputs]).float()
        num_stages, batch, k = logits.shape[:3]
        pred = {
            "logits": logits.flatten(0, 2),
            "boxes": boxes.flatten(0, 2),
            "boxes_norm": (boxes / target.image_scale[None, :, None, :]).flatten(0, 2),
            "codes": codes.flatten(0, 2),
        }
        if target.labels.numel() == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [[(empty, empty) for _ in range(batch)] for _ in range(num_stages)]
        cost = self.cost_matrix(pred, target).view(num_stages, batch, k, -1).cpu()
        blocks = [c.split(target.sizes, dim=-1) for c in cost.unbind(0)]
        result = []
        for stage_blocks in blocks:
            stage_indices = []
            for b, block in enumerate(stage_blocks):
                rows, cols = linear_sum_assignment(block[b].numpy())
                stage_indices.append(
                    (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
                )
            result.append(stage_indices)
        return result

    def match(self, outputs: dict, target: BatchTargets) -> Indices:
        """DETR-style single-output matching."""
        return self.match_stages([outputs], target)[0]


def build_matcher(matcher_cfg, codec: torch.nn.Module) -> HungarianMatcher:
    return HungarianMatcher(
        codec,
        mask_cost=matcher_cfg.mask_cost,
        cost_class=matcher_cfg.cost_class,
        cost_l1=matcher_cfg.cost_l1,
        cost_giou=matcher_cfg.cost_giou,
        cost_mask=matcher_cfg.cost_mask,
        focal_alpha=matcher_cfg.focal_alpha,
        focal_gamma=matcher_cfg.focal_gamma,
    )
