"""Batch collation: pad images to one shape, keep per-image targets as a list."""

from __future__ import annotations

import torch
from torch import Tensor


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def padded_size(height: int, width: int, size_divisibility: int) -> tuple[int, int]:
    """(H, W) that :func:`collate_batch` pads a batch whose largest image is ``height x width`` to."""
    divisor = max(int(size_divisibility), 1)
    return _round_up(int(height), divisor), _round_up(int(width), divisor)


def collate_batch(batch: list[tuple[Tensor, dict]], size_divisibility: int = 32) -> dict:
    """Collate ``(image uint8 [3,H,W], target)`` pairs for the model.

    Returns ``{"images": uint8 [B,3,Hp,Wp], "image_sizes": int64 [B,2], "targets": list[dict]}``.
    Images are zero-padded at the bottom/right to a multiple of ``size_divisibility`` (the FPN's
    largest stride, as detectron2's ImageList), so feature maps of all levels align; padding at
    bottom/right keeps absolute box coordinates valid. ``image_sizes`` holds each (h, w) before
    padding; masks in the targets stay unpadded at their image's size.
    """
    if not batch:
        raise ValueError("collate_batch got an empty batch")
    images = [image for image, _ in batch]
    channels = images[0].shape[0]
    height, width = padded_size(
        max(int(im.shape[-2]) for im in images), max(int(im.shape[-1]) for im in images), size_divisibility
    )
    padded = images[0].new_zeros((len(images), channels, height, width))
    for slot, image in zip(padded, images, strict=True):
        slot[:, : image.shape[-2], : image.shape[-1]].copy_(image)
    sizes = torch.tensor([[im.shape[-2], im.shape[-1]] for im in images], dtype=torch.int64)
    return {"images": padded, "image_sizes": sizes, "targets": [target for _, target in batch]}
