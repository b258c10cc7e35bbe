"""RoI feature pooling: each query box reads an SxS feature grid from its FPN level (docs/method.md#architecture).

Two interchangeable implementations (``model.pooler``):
- ``roi_align``: torchvision's ``roi_align`` per level (the reference; its CPU kernels are single-threaded).
- ``grid_sample``: the same bilinear RoIAlign sampling (aligned=True, fixed sampling ratio, FPN level
  rule of Eq. 1 in the FPN paper) done with one ``F.grid_sample`` per level, whose CPU forward and
  backward run multi-threaded. Interior samples match RoIAlign exactly; samples that fall outside
  the feature map read the border value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from istr.model.backbone import LEVEL_NAMES

STRIDES = (4, 8, 16, 32)


def assign_levels(boxes: Tensor, canonical_scale: float = 224.0, canonical_level: int = 4) -> Tensor:
    """FPN level index (0 = P2 ... 3 = P5) per box: floor(4 + log2(sqrt(area) / 224)), clamped."""
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).clamp(min=1e-6)
    level = torch.floor(canonical_level + torch.log2(area.sqrt() / canonical_scale + 1e-8))
    return (level.clamp(2, 5) - 2).long()


def connect_unused_levels(pooled: Tensor, features: dict[str, Tensor], used: list[int]) -> Tensor:
    """Add 0 x every FPN level no box was assigned to, so its parameters still get a (zero) grad.

    Small images put every box on P2; without this DDP fails on unused FPN parameters.
    """
    for level, name in enumerate(LEVEL_NAMES):
        if level not in used:
            pooled = pooled + 0.0 * features[name].sum()
    return pooled


class GridSamplePooler(nn.Module):
    def __init__(self, output_size: int, sampling_ratio: int) -> None:
        super().__init__()
        self.output_size, self.sampling_ratio = output_size, max(1, sampling_ratio)

    def sample_grid(self, boxes: Tensor, stride: int, height: int, width: int) -> Tensor:
        """Normalised grid_sample coordinates [..., S*S, r*r, 2] of the RoIAlign sampling points.

        Bins in row-major order, then the r x r samples of each bin (row-major), so one bin's samples
        are adjacent in ``grid_sample``'s output and average over its contiguous last dim.
        """
        s, r = self.output_size, self.sampling_ratio
        steps = (torch.arange(s * r, device=boxes.device, dtype=boxes.dtype) + 0.5) / (s * r)
        x0, y0, x1, y1 = (boxes / stride).unbind(-1)
        xs = (x0 - 0.5)[..., None] + (x1 - x0)[..., None] * steps  # feature-pixel coordinates (aligned=True)
        ys = (y0 - 0.5)[..., None] + (y1 - y0)[..., None] * steps
        gx = ((2 * xs + 1) / width - 1).unflatten(-1, (s, r))  # align_corners=False convention; [..., S, r]
        gy = ((2 * ys + 1) / height - 1).unflatten(-1, (s, r))
        # [..., S_y, S_x, r_y, r_x, 2]
        gx = gx[..., None, :, None, :].expand(*gx.shape[:-2], s, s, r, r)
        gy = gy[..., :, None, :, None].expand(*gy.shape[:-2], s, s, r, r)
        return torch.stack((gx, gy), dim=-1).flatten(-5, -4).flatten(-3, -2)

    def pool_level(self, feature: Tensor, boxes: Tensor, stride: int) -> Tensor:
        """feature [B,C,H,W], boxes [B,m,4] on this level -> [B, m, S*S, C]."""
        batch, m = boxes.shape[:2]
        grid = self.sample_grid(boxes, stride, feature.shape[-2], feature.shape[-1])  # [B,m,S*S,r*r,2]
        sampled = F.grid_sample(feature, grid.flatten(1, 2), align_corners=False, padding_mode="border")
        # [B, C, m*S*S]: mean of each bin's r x r samples; sum then scale, so the backward's division
        # runs on this r*r times smaller tensor
        pooled = sampled.sum(-1) / self.sampling_ratio**2
        return pooled.transpose(1, 2).unflatten(1, (m, self.output_size**2))

    def forward(self, features: dict[str, Tensor], boxes: Tensor) -> Tensor:
        """features P2-P5 [B,C,H,W], boxes [B,k,4] -> RoI tokens [B*k, S*S, C]."""
        batch, k = boxes.shape[:2]
        levels = assign_levels(boxes)
        used = levels.unique().tolist()
        if len(used) == 1:  # common case (one object scale): no packing needed
            pooled = self.pool_level(features[LEVEL_NAMES[used[0]]], boxes, STRIDES[used[0]])
            return connect_unused_levels(pooled.flatten(0, 1), features, used)
        out: Tensor | None = None
        for level in used:
            selected = levels == level
            # Pack each image's boxes of this level into the first slots of a [B, m, 4] tensor.
            rank = selected.long().cumsum(1) - 1
            b_idx, q_idx = selected.nonzero(as_tuple=True)
            slots = rank[b_idx, q_idx]
            packed = boxes.new_zeros((batch, int(selected.sum(1).max()), 4))
            packed[b_idx, slots] = boxes[b_idx, q_idx]
            pooled = self.pool_level(features[LEVEL_NAMES[level]], packed, STRIDES[level])
            if out is None:  # pooled's dtype, not the features': autocast runs grid_sample in float32
                out = pooled.new_empty((batch, k, *pooled.shape[2:]))
            out[b_idx, q_idx] = pooled[b_idx, slots]
        return connect_unused_levels(out.flatten(0, 1), features, used)


class RoIAlignPooler(nn.Module):
    """torchvision ``roi_align`` (aligned=True, i.e. detectron2's ROIAlignV2 used by ISTR) per FPN level."""

    def __init__(self, output_size: int, sampling_ratio: int) -> None:
        super().__init__()
        self.output_size, self.sampling_ratio = output_size, sampling_ratio

    def forward(self, features: dict[str, Tensor], boxes: Tensor) -> Tensor:
        """features P2-P5 [B,C,H,W], boxes [B,k,4] -> RoI tokens [B*k, S*S, C]."""
        batch, k = boxes.shape[:2]
        flat_boxes = boxes.flatten(0, 1)
        image_idx = torch.arange(batch, device=boxes.device).repeat_interleave(k)
        levels = assign_levels(flat_boxes)
        first = features[LEVEL_NAMES[0]]
        out = first.new_zeros((batch * k, first.shape[1], self.output_size, self.output_size))
        used = levels.unique().tolist()
        for level in used:
            idx = (levels == level).nonzero().flatten()
            rois = torch.cat([image_idx[idx, None].to(boxes.dtype), flat_boxes[idx]], dim=1)
            out[idx] = roi_align(features[LEVEL_NAMES[level]], rois, self.output_size, 1.0 / STRIDES[level],
                                 self.sampling_ratio, aligned=True)
        return connect_unused_levels(out.flatten(2).transpose(1, 2), features, used)


POOLERS: dict[str, type[nn.Module]] = {"roi_align": RoIAlignPooler, "grid_sample": GridSamplePooler}
