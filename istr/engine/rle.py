"""COCO RLE of predicted masks from each mask's occupied region only (docs/method.md#evaluation).

pycocotools' ``encode`` scans every pixel of every mask on the CPU: 100 full-image masks per image, so
at the paper's test size it cost more than the forward pass. Here the tight box of each mask's
non-zero pixels is found with tensor ops (on the model's device), only those crops travel to the CPU,
and the column-major runs are computed from the crop's non-zero positions. pycocotools then
compresses the counts, so the strings are byte-identical to ``mask_utils.encode`` of the full mask.
"""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor


def _counts(crop: np.ndarray, top: int, left: int, height: int, width: int) -> list[int]:
    """Column-major run lengths (zeros first) of a full ``height x width`` mask that is ``crop`` at (top, left)."""
    col, row = np.nonzero(crop.T)  # crop.T's row-major order is the crop's column-major order
    if col.size == 0:
        return [height * width]
    positions = (left + col).astype(np.int64) * height + top + row  # index in the full column-major order
    breaks = np.flatnonzero(np.diff(positions) != 1)
    starts = positions[np.concatenate(([0], breaks + 1))]
    ends = positions[np.concatenate((breaks, [positions.size - 1]))] + 1
    runs = np.empty(2 * starts.size + 1, dtype=np.int64)
    runs[0] = starts[0]
    runs[1::2] = ends - starts
    runs[2:-1:2] = starts[1:] - ends[:-1]
    runs[-1] = height * width - ends[-1]
    return runs[:-1].tolist() if runs[-1] == 0 else runs.tolist()  # pycocotools drops a final empty run


def encode_masks(masks: Tensor) -> list[dict]:
    """Binary masks ``[n, H, W]`` (any device) -> compressed COCO RLEs (``counts`` as bytes), as pycocotools."""
    n, height, width = masks.shape
    if n == 0:
        return []
    binary = masks != 0
    row_any, col_any = binary.any(dim=2), binary.any(dim=1)
    occupied = row_any.any(dim=1)
    # first / one-past-last occupied row and column of each mask (0, 0 for an empty one)
    top = torch.where(occupied, row_any.float().argmax(dim=1), 0)
    bottom = torch.where(occupied, height - row_any.flip(1).float().argmax(dim=1), 0)
    left = torch.where(occupied, col_any.float().argmax(dim=1), 0)
    right = torch.where(occupied, width - col_any.flip(1).float().argmax(dim=1), 0)
    bounds = torch.stack([top, bottom, left, right], 1).cpu().tolist()
    uncompressed = []
    for mask, (y0, y1, x0, x1) in zip(binary, bounds, strict=True):
        crop = mask[y0:y1, x0:x1].cpu().numpy()
        uncompressed.append({"size": [height, width], "counts": _counts(crop, y0, x0, height, width)})
    return mask_utils.frPyObjects(uncompressed, height, width)
