"""Tests of inference: mask pasting and top-k post-processing (docs/method.md#inference)."""

from __future__ import annotations

import pytest
import torch

from istr.codecs import DCTCodec
from istr.model.inference import paste_masks, postprocess

SIZE = 28
BOX = (10, 20, 30, 40)  # x1, y1, x2, y2


@pytest.fixture(scope="module")
def codec() -> DCTCodec:
    return DCTCodec(dim=SIZE * SIZE)  # exact round trip: decode(encode(m)) > 0 is m


def full_mask() -> torch.Tensor:
    return torch.ones((SIZE, SIZE))


def left_half_mask() -> torch.Tensor:
    mask = torch.zeros((SIZE, SIZE))
    mask[:, : SIZE // 2] = 1
    return mask


def region(height: int, width: int, x1: int, y1: int, x2: int, y2: int) -> torch.Tensor:
    """Boolean [H,W] with pixels x in [x1,x2), y in [y1,y2) set (clipped to the canvas)."""
    out = torch.zeros((height, width), dtype=torch.bool)
    out[max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)] = True
    return out


def assert_fills(pasted: torch.Tensor, box: tuple[int, int, int, int], threshold: float = 0.5) -> None:
    """``pasted`` [H,W] is on inside ``box`` and exactly zero outside it, up to 1 px at the edges."""
    height, width = pasted.shape
    x1, y1, x2, y2 = box
    inner = region(height, width, x1 + 1, y1 + 1, x2 - 1, y2 - 1)
    outer = region(height, width, x1 - 1, y1 - 1, x2 + 1, y2 + 1)
    assert bool((pasted[inner] > threshold).all()), "pixels inside the box are off"
    assert bool((pasted[~outer] == 0).all()), "pixels outside the box are on"
    area = int((pasted > threshold).sum())
    assert int(inner.sum()) <= area <= int(outer.sum())


def test_paste_full_mask_fills_exactly_its_box():
    pasted = paste_masks(full_mask()[None], torch.tensor([BOX], dtype=torch.float32), 64, 64)
    assert pasted.shape == (1, 64, 64)
    assert_fills(pasted[0], BOX)


def test_paste_left_half_mask_fills_left_half_of_box():
    pasted = paste_masks(left_half_mask()[None], torch.tensor([BOX], dtype=torch.float32), 64, 64)[0]
    x1, y1, x2, y2 = BOX
    assert_fills(pasted, (x1, y1, (x1 + x2) // 2, y2))


def test_paste_many_masks_each_into_its_own_box():
    boxes = [(0, 0, 16, 8), (40, 30, 64, 64), BOX]
    masks = torch.stack([full_mask(), left_half_mask(), full_mask()])
    pasted = paste_masks(masks, torch.tensor(boxes, dtype=torch.float32), 64, 64)
    assert pasted.shape == (3, 64, 64)
    assert_fills(pasted[0], boxes[0])
    assert_fills(pasted[1], (40, 30, 52, 64))
    assert_fills(pasted[2], BOX)


def test_paste_no_masks():
    pasted = paste_masks(torch.zeros((0, SIZE, SIZE)), torch.zeros((0, 4)), 32, 48)
    assert pasted.shape == (0, 32, 48)


def fake_outputs(codec, batch: int = 2, k: int = 5, num_classes: int = 3, seed: int = 0) -> dict:
    """Random logits, boxes inside a 32x32 input, and every query's code = full 28x28 mask."""
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand((batch, k, 2), generator=gen) * 16
    wh = torch.rand((batch, k, 2), generator=gen) * 12 + 4
    codes = codec.encode(full_mask()[None]).expand(batch * k, -1).reshape(batch, k, -1)
    return {
        "logits": torch.randn((batch, k, num_classes), generator=gen),
        "boxes": torch.cat([xy, xy + wh], dim=-1),
        "codes": codes,
        "aux": [],
    }


IMAGE_SIZES = torch.tensor([[32, 32], [32, 24]])  # (h, w) the model saw
ORIG_SIZES = torch.tensor([[64, 96], [32, 24]])  # (h, w) of the original images


def test_postprocess_topk_sorted_and_in_range(codec):
    outputs = fake_outputs(codec)
    results = postprocess(outputs, codec, IMAGE_SIZES, ORIG_SIZES, max_detections=4)
    assert len(results) == 2
    for i, res in enumerate(results):
        assert set(res) == {"scores", "labels", "boxes", "masks"}
        assert res["scores"].shape == (4,) and res["labels"].shape == (4,) and res["boxes"].shape == (4, 4)
        assert res["masks"].shape == (4, *ORIG_SIZES[i].tolist()) and res["masks"].dtype == torch.bool
        assert bool((res["scores"][:-1] >= res["scores"][1:]).all())
        expected = outputs["logits"][i].sigmoid().flatten().topk(4).values
        torch.testing.assert_close(res["scores"], expected)
        assert bool(((res["labels"] >= 0) & (res["labels"] < 3)).all())


def test_postprocess_caps_at_k_times_classes(codec):
    results = postprocess(fake_outputs(codec, k=2, num_classes=3), codec, IMAGE_SIZES, ORIG_SIZES, max_detections=100)
    assert all(len(r["scores"]) == 6 for r in results)


def test_postprocess_rescales_boxes_and_pastes_masks(codec):
    outputs = fake_outputs(codec, batch=1, k=2, num_classes=2)
    outputs["logits"] = torch.tensor([[[-9.0, 5.0], [-6.0, -8.0]]])  # top-2: (query 0, class 1), (query 1, class 0)
    outputs["boxes"] = torch.tensor([[[4.0, 8.0, 12.0, 24.0], [20.0, 20.0, 40.0, 40.0]]])
    image_sizes, orig_sizes = torch.tensor([[32, 32]]), torch.tensor([[64, 96]])  # x3 in width, x2 in height
    (res,) = postprocess(outputs, codec, image_sizes, orig_sizes, max_detections=2)
    assert res["labels"].tolist()[0] == 1
    torch.testing.assert_close(res["boxes"][0], torch.tensor([12.0, 16.0, 36.0, 48.0]))
    # Query 1's box (60, 40, 120, 80) is clipped to the 96 x 64 original image.
    assert res["labels"].tolist()[1] == 0
    torch.testing.assert_close(res["boxes"][1], torch.tensor([60.0, 40.0, 96.0, 64.0]))
    assert_fills(res["masks"][0].float(), (12, 16, 36, 48))
    assert_fills(res["masks"][1].float(), (60, 40, 96, 64))
