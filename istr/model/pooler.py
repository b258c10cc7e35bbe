"""RoI feature pooling: each query box reads an SxS feature grid from its FPN level (ISTR_SPEC §4).

Two interchangeable implementations (``model.pooler``):
- ``roi_align``: torchvision's MultiScaleRoIAlign (the reference; its CPU kernels are single-threaded).
- ``grid_sample``: the same bilinear RoIAlign sampling (aligned=True, fixed sampling ratio, FPN level
  rule of Eq. 1 in the FPN paper) done with one ``F.grid_sample`` per level, whose CPU forward and
  backward run multi-threaded. Interior samples match RoIAlign exactly; samples that fall outside
  the feature map read the border value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign

from istr.model.backbone import LEVEL_NAMES

STRIDES = (4, 8, 16, 32)


def assign_levels(boxes: Tensor, canonical_scale: float = 224.0, canonical_level: int = 4) -> Tensor:
    """FPN level index (0 = P2 ... 3 = P5) per box: floor(4 + log2(sqrt(area) / 224)), clamped."""
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).clamp(min=1e-6)
    level = torch.floor(canonical_level + torch.log2(area.sqrt() / canonical_scale + 1e-8))
    return (level.clamp(2, 5) - 2).long()


class GridSamplePooler(nn.Module):
    def __init__(self, output_size: int, sampling_ratio: int) -> None:
        super().__init__()
        self.output_size, self.sampling_ratio = output_size, max(1, sampling_ratio)

    def sample_grid(self, boxes: Tensor, stride: int, height: int, width: int) -> Tensor:
        """Normalised grid_sample coordinates [..., P, P, 2] of the RoIAlign sampling points (P = S*r)."""
        points = self.output_size * self.sampling_ratio
        steps = (torch.arange(points, device=boxes.device, dtype=boxes.dtype) + 0.5) / points
        x0, y0, x1, y1 = (boxes / stride).unbind(-1)
        xs = (x0 - 0.5)[..., None] + (x1 - x0)[..., None] * steps  # feature-pixel coordinates (aligned=True)
        ys = (y0 - 0.5)[..., None] + (y1 - y0)[..., None] * steps
        gx = (2 * xs + 1) / width - 1  # align_corners=False convention
        gy = (2 * ys + 1) / height - 1
        return torch.stack(torch.broadcast_tensors(gx[..., None, :], gy[..., :, None]), dim=-1)

    def forward(self, features: dict[str, Tensor], boxes: Tensor) -> Tensor:
        """features P2-P5 [B,C,H,W], boxes [B,k,4] -> [B*k, C, S, S]."""
        batch, k = boxes.shape[:2]
        first = features[LEVEL_NAMES[0]]
        s, r = self.output_size, self.sampling_ratio
        out = first.new_zeros((batch, k, first.shape[1], s * r, s * r))
        levels = assign_levels(boxes)
        for level, (name, stride) in enumerate(zip(LEVEL_NAMES, STRIDES)):
            selected = levels == level
            if not selected.any():
                continue
            feature = features[name]
            # Pack each image's boxes of this level into the first slots of a [B, m, ...] grid.
            rank = selected.long().cumsum(1) - 1
            width = int(selected.sum(1).max())
            b_idx, q_idx = selected.nonzero(as_tuple=True)
            packed = boxes.new_zeros((batch, width, 4))
            packed[b_idx, rank[b_idx, q_idx]] = boxes[b_idx, q_idx]
            grid = self.sample_grid(packed, stride, feature.shape[-2], feature.shape[-1])  # [B,m,P,P,2]
            sampled = F.grid_sample(feature, grid.flatten(1, 2), align_corners=False, padding_mode="border")
            sampled = sampled.unflatten(2, (width, s * r)).permute(0, 2, 1, 3, 4)  # [B,m,C,P,P]
            out[b_idx, q_idx] = sampled[b_idx, rank[b_idx, q_idx]]
        out = out.flatten(0, 1)
        return F.avg_pool2d(out, r) if r > 1 else out


class RoIAlignPooler(nn.Module):
    """torchvision MultiScaleRoIAlign with the same [B,k,4] -> [B*k,C,S,S] interface."""

    def __init__(self, output_size: int, sampling_ratio: int) -> None:
        super().__init__()
        self.pooler = MultiScaleRoIAlign(list(LEVEL_NAMES), output_size, sampling_ratio)

    def forward(self, features: dict[str, Tensor], boxes: Tensor) -> Tensor:
        # The level scales are inferred once from feature size / image size: give the padded size
        # (a multiple of 32) so they are exactly 1/4 ... 1/32 whatever the first batch holds.
        padded = features[LEVEL_NAMES[0]].shape[-2] * STRIDES[0], features[LEVEL_NAMES[0]].shape[-1] * STRIDES[0]
        return self.pooler(features, list(boxes.unbind(0)), [padded] * boxes.shape[0])


POOLERS: dict[str, type[nn.Module]] = {"roi_align": RoIAlignPooler, "grid_sample": GridSamplePooler}
