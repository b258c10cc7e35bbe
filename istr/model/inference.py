"""Inference: top-100 (query, class) pairs, decode embeddings, paste masks (docs/method.md#inference).

No NMS: the set prediction is one-to-one. Mask decode and paste are batched over all detections.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Paste at most this many pixels*masks at once to bound memory at COCO resolution.
_PASTE_CHUNK_PIXELS = 2**26


def paste_masks(mask_probs: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """Paste [n,S,S] mask probabilities into their x1y1x2y2 ``boxes`` on an HxW canvas -> [n,H,W].

    One grid_sample call per chunk (no per-instance loop); pixels outside the box read zero padding.
    """
    n = mask_probs.shape[0]
    if n == 0:
        return mask_probs.new_zeros((0, height, width))
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32) + 0.5
    boxes = boxes.float()
    x0, y0, x1, y1 = boxes.unbind(1)
    # Map pixel centres to [-1, 1] in each box's own frame (align_corners=False convention).
    gx = (xs[None, :] - x0[:, None]) / (x1 - x0).clamp(min=1e-3)[:, None] * 2 - 1
    gy = (ys[None, :] - y0[:, None]) / (y1 - y0).clamp(min=1e-3)[:, None] * 2 - 1
    chunk = max(1, _PASTE_CHUNK_PIXELS // (height * width))
    pasted = []
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        m = gx[sl].shape[0]
        grid = torch.stack(
            [gx[sl][:, None, :].expand(m, height, width), gy[sl][:, :, None].expand(m, height, width)], 3
        )
        pasted.append(F.grid_sample(mask_probs[sl, None].float(), grid, align_corners=False)[:, 0])
    return torch.cat(pasted)


@torch.no_grad()
def postprocess(
    outputs: dict,
    codec: torch.nn.Module,
    image_sizes: Tensor,
    orig_sizes: Tensor,
    max_detections: int = 100,
    mask_threshold: float = 0.5,
) -> list[dict[str, Tensor]]:
    """Model outputs -> per image {scores, labels, boxes, masks} in ORIGINAL image coordinates."""
    logits, boxes, codes = outputs["logits"].float(), outputs["boxes"].float(), outputs["codes"].float()
    batch, k, num_classes = logits.shape
    scores, flat_idx = logits.sigmoid().flatten(1).topk(min(max_detections, k * num_classes), dim=1)
    query_idx, labels = flat_idx // num_classes, flat_idx % num_classes
    picked_boxes = torch.gather(boxes, 1, query_idx[..., None].expand(-1, -1, 4))
    picked_codes = torch.gather(codes, 1, query_idx[..., None].expand(-1, -1, codes.shape[-1]))
    mask_probs = codec.decode(picked_codes.flatten(0, 1)).sigmoid().unflatten(0, query_idx.shape)
    results = []
    for i in range(batch):
        h, w = (int(v) for v in image_sizes[i])
        oh, ow = (int(v) for v in orig_sizes[i])
        scale = torch.tensor([ow / w, oh / h, ow / w, oh / h], device=boxes.device)
        img_boxes = picked_boxes[i] * scale
        # Paste into the unclipped box so the mask keeps its shape; report the clipped box.
        masks = paste_masks(mask_probs[i], img_boxes, oh, ow) > mask_threshold
        img_boxes[:, 0::2] = img_boxes[:, 0::2].clamp(0, ow)
        img_boxes[:, 1::2] = img_boxes[:, 1::2].clamp(0, oh)
        results.append({"scores": scores[i], "labels": labels[i], "boxes": img_boxes, "masks": masks})
    return results
