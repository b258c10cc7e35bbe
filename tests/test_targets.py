"""Tests of the ground-truth preparation shared by matching and the loss (docs/method.md#mask-embedding, #loss)."""

from __future__ import annotations

import pytest
import torch

from istr.codecs import DCTCodec
from istr.targets import crop_masks, prepare_targets

SIZE = 28


def rect_mask(hw: tuple[int, int], x1: int, y1: int, x2: int, y2: int) -> torch.Tensor:
    """uint8 [H,W] mask with pixels x in [x1,x2), y in [y1,y2) set (the data loader's format)."""
    mask = torch.zeros(hw, dtype=torch.uint8)
    mask[y1:y2, x1:x2] = 1
    return mask


def image_target(hw: tuple[int, int], rects: list[tuple[int, int, int, int]], labels: list[int]) -> dict:
    """A data-loader target whose masks fill the left half of each box (boxes are the rects widened x2)."""
    boxes = [(x1, y1, x1 + 2 * (x2 - x1), y2) for x1, y1, x2, y2 in rects]
    masks = [rect_mask(hw, *r) for r in rects]
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.stack(masks) if masks else torch.zeros((0, *hw), dtype=torch.uint8),
    }


def left_half() -> torch.Tensor:
    crop = torch.zeros((SIZE, SIZE))
    crop[:, : SIZE // 2] = 1
    return crop


@pytest.fixture(scope="module")
def codec() -> DCTCodec:
    return DCTCodec(dim=SIZE * SIZE)


def test_crop_left_half_rectangle():
    # Box 32x32 at (8,16); the mask fills its left 16 columns.
    mask = rect_mask((64, 64), 8, 16, 24, 48)
    crop = crop_masks(mask[None], torch.tensor([[8.0, 16.0, 40.0, 48.0]]))
    assert crop.shape == (1, SIZE, SIZE) and crop.dtype == torch.float32
    torch.testing.assert_close(crop[0], left_half())


def test_crop_resizes_and_ignores_pixels_outside_the_box():
    # A 7x7 box (upsampled 4x) fully covered by a larger blob: the crop is all ones.
    mask = rect_mask((20, 20), 0, 0, 15, 15)
    crop = crop_masks(mask[None], torch.tensor([[4.0, 4.0, 11.0, 11.0]]))
    assert bool((crop == 1).all())
    # The same box over an empty region is all zeros, whatever lies outside it.
    crop = crop_masks(mask[None], torch.tensor([[15.0, 15.0, 20.0, 20.0]]))
    assert bool((crop == 0).all())


def test_crop_masks_empty():
    crop = crop_masks(torch.zeros((0, 10, 10), dtype=torch.uint8), torch.zeros((0, 4)))
    assert crop.shape == (0, SIZE, SIZE) and crop.dtype == torch.float32


def test_prepare_targets_concatenates_images(codec):
    # Image 0 is 64 high x 48 wide with two instances, image 1 is 32 x 64 with one.
    targets = [
        image_target((64, 48), [(4, 8, 12, 40), (20, 0, 30, 20)], [2, 0]),
        image_target((32, 64), [(10, 4, 26, 28)], [1]),
    ]
    image_sizes = torch.tensor([[64, 48], [32, 64]])
    batch = prepare_targets(targets, image_sizes, codec, torch.device("cpu"))

    assert batch.sizes == [2, 1]
    assert batch.num_boxes == 3.0
    assert batch.labels.tolist() == [2, 0, 1] and batch.labels.dtype == torch.int64
    torch.testing.assert_close(batch.boxes, torch.cat([t["boxes"] for t in targets]))
    torch.testing.assert_close(batch.image_scale, torch.tensor([[48.0, 64.0, 48.0, 64.0], [64.0, 32.0, 64.0, 32.0]]))
    expected_norm = torch.tensor(
        [
            [4 / 48, 8 / 64, 20 / 48, 40 / 64],
            [20 / 48, 0 / 64, 40 / 48, 20 / 64],
            [10 / 64, 4 / 32, 42 / 64, 28 / 32],
        ]
    )
    torch.testing.assert_close(batch.boxes_norm, expected_norm)
    # Every mask fills the left half of its box, so every crop is the left-half mask.
    torch.testing.assert_close(batch.masks, left_half().expand(3, SIZE, SIZE))
    torch.testing.assert_close(batch.codes, codec.encode(batch.masks))
    assert batch.codes.shape == (3, codec.dim)


def test_prepare_targets_with_an_empty_image(codec):
    targets = [image_target((32, 32), [], []), image_target((32, 32), [(0, 0, 8, 16)], [4])]
    batch = prepare_targets(targets, torch.tensor([[32, 32], [32, 32]]), codec, torch.device("cpu"))
    assert batch.sizes == [0, 1]
    assert batch.labels.tolist() == [4]
    assert batch.masks.shape == (1, SIZE, SIZE) and batch.codes.shape == (1, codec.dim)
    assert batch.num_boxes == 1.0


def test_prepare_targets_all_images_empty(codec):
    targets = [image_target((32, 32), [], []) for _ in range(2)]
    batch = prepare_targets(targets, torch.tensor([[32, 32], [32, 32]]), codec, torch.device("cpu"))
    assert batch.sizes == [0, 0]
    assert batch.labels.shape == (0,) and batch.boxes.shape == (0, 4) and batch.boxes_norm.shape == (0, 4)
    assert batch.masks.shape == (0, SIZE, SIZE) and batch.codes.shape == (0, codec.dim)
    assert batch.num_boxes == 1.0  # clamped: the loss normaliser never divides by zero
