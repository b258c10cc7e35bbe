"""COCO RLE of predicted masks without a host scan of every pixel (docs/method.md#evaluation).

pycocotools' ``encode`` scans every pixel of every mask on the CPU: 100 full-image masks per image, so
at the paper's test size it cost more than the forward pass. Here the tight box of each mask's
non-zero pixels is found with tensor ops (on the model's device), only those crops travel to the CPU,
and the column-major runs are computed from the crop's non-zero positions. On the GPU all masks' value
changes are found at once and only their positions travel. pycocotools then compresses the counts, so
the strings are byte-identical to ``mask_utils.encode`` of the full mask.
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


def _runs_from_changes(binary: Tensor) -> list[list[int]]:
    """Column-major run lengths of each mask from the positions where its pixels change value, found on the
    masks' device for all masks at once: only those positions (a few per column) cross to the host."""
    n, height, width = binary.shape
    flat = binary.transpose(1, 2).reshape(n, height * width)  # column-major pixel order of each mask
    mask_idx, position = (flat[:, 1:] != flat[:, :-1]).nonzero(as_tuple=True)  # sorted by mask, then position
    per_mask = torch.bincount(mask_idx, minlength=n).cpu().numpy()
    starts_with_one = flat[:, 0].cpu().numpy()
    boundaries = np.split((position + 1).cpu().numpy(), np.cumsum(per_mask)[:-1])
    runs = []
    for first, inner in zip(starts_with_one, boundaries, strict=True):
        counts = np.diff(np.concatenate(([0], inner, [height * width])))
        runs.append(([0] if first else []) + counts.tolist())  # COCO counts start with a run of zeros
    return runs


def _runs_from_regions(binary: Tensor) -> list[list[int]]:
    """Column-major run lengths of each mask from its occupied box only (cheap on the CPU for small masks)."""
    n, height, width = binary.shape
    row_any, col_any = binary.any(dim=2), binary.any(dim=1)
    occupied = row_any.any(dim=1)
    # first / one-past-last occupied row and column of each mask (0, 0 for an empty one)
    top = torch.where(occupied, row_any.float().argmax(dim=1), 0)
    bottom = torch.where(occupied, height - row_any.flip(1).float().argmax(dim=1), 0)
    left = torch.where(occupied, col_any.float().argmax(dim=1), 0)
    right = torch.where(occupied, width - col_any.flip(1).float().argmax(dim=1), 0)
    bounds = torch.stack([top, bottom, left, right], 1).cpu().tolist()
    return [_counts(mask[y0:y1, x0:x1].cpu().numpy(), y0, x0, height, width)
            for mask, (y0, y1, x0, x1) in zip(binary, bounds, strict=True)]


def encode_masks(masks: Tensor, by_changes: bool | None = None) -> list[dict]:
    """Binary masks ``[n, H, W]`` (any device) -> compressed COCO RLEs (``counts`` as bytes), as pycocotools.

    ``by_changes`` (default: on CUDA) finds every mask's value changes on the device in one pass and moves
    only those positions to the host; otherwise each mask's occupied box is cropped and scanned on the CPU.
    """
    n, height, width = masks.shape
    if n == 0:
        return []
    binary = masks != 0
    use_changes = masks.is_cuda if by_changes is None else by_changes
    runs = _runs_from_changes(binary) if use_changes else _runs_from_regions(binary)
    return mask_utils.frPyObjects([{"size": [height, width], "counts": r} for r in runs], height, width)
