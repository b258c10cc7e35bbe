"""Transforms keep image, boxes and masks aligned; resize caps at max_size; flip is involutive."""

from __future__ import annotations

import pytest
import torch

from istr.data.transforms import (
    Compose,
    RandomApply,
    RandomCrop,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    build_transforms,
)

COLOUR = torch.tensor([200, 50, 30], dtype=torch.uint8)


def _sample(height: int = 40, width: int = 60) -> tuple[torch.Tensor, dict]:
    """A coloured rectangle (rows 10..19, cols 5..24) in image and mask, and its box."""
    image = torch.zeros((3, height, width), dtype=torch.uint8)
    image[:, 10:20, 5:25] = COLOUR[:, None, None]
    masks = torch.zeros((1, height, width), dtype=torch.uint8)
    masks[0, 10:20, 5:25] = 1
    target = {
        "boxes": torch.tensor([[5.0, 10.0, 25.0, 20.0]]),
        "labels": torch.tensor([0]),
        "masks": masks,
        "size": (height, width),
    }
    return image, target


def _tight_box(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_resize_and_flip_keep_image_mask_box_aligned() -> None:
    image, target = _sample()
    out_image, out = Compose([ResizeShortestEdge([80], 1000), RandomHorizontalFlip(1.0)])(
        image, target
    )
    assert out_image.shape == (3, 80, 120) and out["size"] == (80, 120)
    assert out["masks"].shape == (1, 80, 120) and out["masks"].dtype == torch.uint8
    # x2 scale then mirror: cols 5..25 -> 10..50 -> 70..110; rows 10..20 -> 20..40.
    assert out["boxes"][0].tolist() == [70.0, 20.0, 110.0, 40.0]
    assert torch.allclose(_tight_box(out["masks"][0]), out["boxes"][0], atol=1.0)
    # Inside the mask (away from the antialiased border) the image has the rectangle's colour.
    inner = out["masks"][0].bool().clone()
    inner[[20, 39], :] = False
    inner[:, [70, 109]] = False
    assert (out_image[:, inner] == COLOUR[:, None]).all()
    assert (out_image[:, out["masks"][0] == 0].float().mean(0) < 120).float().mean() > 0.95
    assert target["size"] == (40, 60)  # the input target is not modified in place


def test_max_size_caps_the_long_side() -> None:
    image, target = _sample(20, 100)
    out_image, out = ResizeShortestEdge([50], max_size=120)(image, target)
    assert out_image.shape[-2:] == (24, 120)
    assert out["size"] == (24, 120) and out["masks"].shape[-2:] == (24, 120)
    assert torch.allclose(out["boxes"][0], torch.tensor([6.0, 12.0, 30.0, 24.0]))


def test_flip_twice_is_identity() -> None:
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 9, 13), dtype=torch.uint8)
    target = {
        "boxes": torch.tensor([[1.0, 2.0, 5.5, 8.0], [0.0, 0.0, 13.0, 9.0]]),
        "masks": torch.randint(0, 2, (2, 9, 13), dtype=torch.uint8),
        "size": (9, 13),
    }
    flip = RandomHorizontalFlip(1.0)
    once_image, once = flip(image, target)
    assert not torch.equal(once_image, image)
    twice_image, twice = flip(once_image, once)
    assert torch.equal(twice_image, image)
    assert torch.equal(twice["boxes"], target["boxes"]) and torch.equal(
        twice["masks"], target["masks"]
    )


def test_empty_targets_are_resized() -> None:
    image = torch.zeros((3, 10, 20), dtype=torch.uint8)
    target = {
        "boxes": torch.zeros((0, 4)),
        "masks": torch.zeros((0, 10, 20), dtype=torch.uint8),
        "size": (10, 20),
    }
    _, out = ResizeShortestEdge([5], 100)(image, target)
    assert out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 5, 10)


def test_randomness_follows_torch_seed() -> None:
    resize = ResizeShortestEdge([10, 20, 30], 1000)
    image, target = _sample()

    def heights(seed: int) -> list[int]:
        torch.manual_seed(seed)
        return [resize(image, target)[1]["size"][0] for _ in range(12)]

    assert heights(1) == heights(1)
    assert set(heights(1)) == {10, 20, 30}


def test_build_transforms() -> None:
    train = build_transforms(True, [32, 48], 100, flip_prob=0.5)
    assert [type(t) for t in train.transforms] == [ResizeShortestEdge, RandomHorizontalFlip]
    test = build_transforms(False, [32], 100)
    assert [type(t) for t in test.transforms] == [ResizeShortestEdge]
    assert test(*_sample())[1]["size"] == (32, 48)
    with pytest.raises(ValueError, match="test_size"):
        build_transforms(False, [32, 48], 100)


@pytest.mark.parametrize("crop_type,size", [("relative_range", [0.7, 0.7]), ("absolute_range", [20, 30])])
def test_random_crop_keeps_boxes_and_masks_inside_the_crop(crop_type, size) -> None:
    torch.manual_seed(0)
    for _ in range(20):
        image, target = _sample()
        out_image, out = RandomCrop(crop_type, size)(image, target)
        ch, cw = out_image.shape[-2:]
        if crop_type == "relative_range":
            assert 28 <= ch <= 40 and 42 <= cw <= 60
        else:
            assert 20 <= ch <= 30 and 20 <= cw <= 30
        assert out["size"] == (ch, cw) and out["masks"].shape[-2:] == (ch, cw)
        assert len(out["boxes"]) == len(out["labels"]) == len(out["masks"])
        for box, mask in zip(out["boxes"], out["masks"], strict=True):
            # The crop clips the box exactly where it clips the (rectangular) mask.
            torch.testing.assert_close(box, _tight_box(mask))
            # The image pixels under the mask are still the rectangle's colour.
            assert (out_image[:, mask.bool()] == COLOUR[:, None]).all()


def test_random_crop_drops_an_instance_outside_the_crop() -> None:
    image, target = _sample(height=40, width=60)
    torch.manual_seed(0)
    dropped = 0
    for _ in range(30):
        _, out = RandomCrop("absolute_range", [8, 8])(image, target)
        dropped += len(out["boxes"]) == 0
        assert out["masks"].flatten(1).any(1).all()  # no empty mask survives
    assert dropped > 0


def test_train_transforms_with_crop_apply_it_with_its_probability() -> None:
    crop = RandomCrop("relative_range", [0.5, 0.5])
    train = build_transforms(True, [40], 100, 0.0, crop=crop, crop_prob=1.0, pre_crop_sizes=[40])
    assert isinstance(train.transforms[0], RandomApply)
    torch.manual_seed(0)
    image, target = _sample()
    # pre-resize (short 40: unchanged) -> crop to <= 40x60 -> resize short side back to 40
    _, out = train(image, target)
    assert min(out["size"]) == 40
    never = build_transforms(True, [40], 100, 0.0, crop=crop, crop_prob=0.0)
    assert never(*_sample())[0].shape[-2:] == (40, 60)
