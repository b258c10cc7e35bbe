"""collate_batch pads to a multiple of size_divisibility and records pre-padding sizes."""

from __future__ import annotations

import pytest
import torch

from istr.data.collate import collate_batch


def _batch() -> list[tuple[torch.Tensor, dict]]:
    return [
        (torch.full((3, 30, 50), 7, dtype=torch.uint8), {"image_id": 1}),
        (torch.full((3, 40, 20), 9, dtype=torch.uint8), {"image_id": 2}),
    ]


def test_pads_to_multiple_and_keeps_content() -> None:
    out = collate_batch(_batch(), size_divisibility=32)
    images = out["images"]
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.uint8
    assert out["image_sizes"].tolist() == [[30, 50], [40, 20]]
    assert out["image_sizes"].dtype == torch.int64
    assert (images[0, :, :30, :50] == 7).all() and (images[1, :, :40, :20] == 9).all()
    # Everything outside each image is zero padding.
    assert images[0, :, 30:].sum() == 0 and images[0, :, :, 50:].sum() == 0
    assert images[1, :, 40:].sum() == 0 and images[1, :, :, 20:].sum() == 0
    assert [t["image_id"] for t in out["targets"]] == [1, 2]


def test_divisibility_one_pads_to_largest_only() -> None:
    assert collate_batch(_batch(), size_divisibility=1)["images"].shape == (2, 3, 40, 50)


def test_exact_multiple_is_not_padded_further() -> None:
    batch = [(torch.ones((3, 32, 64), dtype=torch.uint8), {})]
    assert collate_batch(batch)["images"].shape == (1, 3, 32, 64)


def test_empty_batch_raises() -> None:
    with pytest.raises(ValueError):
        collate_batch([])
