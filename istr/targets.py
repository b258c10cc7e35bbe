"""Ground truth in the form matching and the loss need: flat tensors + 28x28 box crops + codes.

Built once per batch and shared by every stage's matching and loss (docs/method.md#matching-cost, #loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torchvision.ops import roi_align

from istr.mask_size import MASK_SIZE


def crop_masks(masks: Tensor, boxes: Tensor, size: int = MASK_SIZE) -> Tensor:
    """Crop each [H,W] mask to its x1y1x2y2 box, resize to size x size -> {0,1} float (docs/method.md#mask-embedding).

    RoIAlign on the binary mask then threshold at 0.5, as detectron2's ``crop_and_resize``.
    """
    n = masks.shape[0]
    if n == 0:
        return masks.new_zeros((0, size, size), dtype=torch.float32)
    rois = torch.cat([torch.arange(n, device=boxes.device, dtype=torch.float32)[:, None], boxes.float()], dim=1)
    crops = roi_align(masks[:, None].float(), rois, (size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return (crops[:, 0] >= 0.5).float()


@dataclass
class BatchTargets:
    """All GT instances of a batch concatenated; ``sizes[b]`` of them belong to image b."""

    labels: Tensor  # [M] contiguous class ids
    boxes: Tensor  # [M,4] absolute x1y1x2y2
    boxes_norm: Tensor  # [M,4] divided by the image's (w,h,w,h)
    masks: Tensor  # [M,S,S] {0,1} crops of the masks inside their boxes
    codes: Tensor  # [M,dim] codec.encode(masks)
    sizes: list[int]
    image_scale: Tensor  # [B,4] (w,h,w,h) of each image, to normalise predicted boxes
    num_boxes: float  # mean over DDP ranks, >= 1: the loss normaliser


@torch.no_grad()
def prepare_targets(
    targets: list[dict], image_sizes: Tensor, codec: torch.nn.Module, device: torch.device
) -> BatchTargets:
    """Per-image target dicts (data loader) -> one :class:`BatchTargets` on ``device``."""
    image_scale = image_sizes.flip(1).repeat(1, 2).float().to(device)
    boxes = [t["boxes"].to(device).float() for t in targets]
    masks = torch.cat([crop_masks(t["masks"].to(device), b, MASK_SIZE) for t, b in zip(targets, boxes)])
    sizes = [len(b) for b in boxes]
    scales = torch.cat([image_scale[i].expand(n, 4) for i, n in enumerate(sizes)])
    all_boxes = torch.cat(boxes)
    codes = codec.encode(masks) if masks.shape[0] else masks.new_zeros((0, codec.dim))
    num_boxes = torch.tensor(float(sum(sizes)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_boxes)
        num_boxes /= dist.get_world_size()
    return BatchTargets(
        labels=torch.cat([t["labels"].to(device) for t in targets]).long(),
        boxes=all_boxes,
        boxes_norm=all_boxes / scales,
        masks=masks,
        codes=codes.float(),
        sizes=sizes,
        image_scale=image_scale,
        num_boxes=max(num_boxes.item(), 1.0),
    )
