"""COCO loader: mask decoding per segmentation format, crowd/empty handling, label map, errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from istr.data.coco import CocoInstances, DatasetError

H, W = 16, 20  # image 10


def _expected_masks() -> np.ndarray:
    masks = np.zeros((3, H, W), dtype=np.uint8)
    masks[0, 2:6, 2:8] = 1  # polygon (2,2)-(8,6): pycocotools fills the half-open box
    masks[1, 3:8, 12] = 1  # uncompressed RLE [195, 5, 120]: column 12 (12*16=192), rows 3..7
    masks[2, 10:14, 14:19] = 1  # compressed RLE
    return masks


def _dataset_dict() -> dict:
    compressed = mask_utils.encode(np.asfortranarray(_expected_masks()[2]))
    crowd = np.zeros((H, W), dtype=np.uint8)
    crowd[8:12, 0:4] = 1
    crowd_rle = mask_utils.encode(np.asfortranarray(crowd))
    return {
        "images": [
            {"id": 10, "file_name": "a.png", "height": H, "width": W},
            {"id": 20, "file_name": "b.png", "height": 10, "width": 12},
        ],
        "categories": [{"id": 90, "name": "c"}, {"id": 1, "name": "a"}, {"id": 5, "name": "b"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 10,
                "category_id": 1,
                "iscrowd": 0,
                "area": 24.0,
                "bbox": [2, 2, 6, 4],
                "segmentation": [[2, 2, 8, 2, 8, 6, 2, 6]],
            },
            {
                "id": 2,
                "image_id": 10,
                "category_id": 5,
                "iscrowd": 0,
                "area": 5.0,
                "bbox": [12, 3, 1, 5],
                "segmentation": {"size": [H, W], "counts": [195, 5, 120]},
            },
            {
                "id": 3,
                "image_id": 10,
                "category_id": 90,
                "iscrowd": 0,
                "area": 20.0,
                "bbox": [14, 10, 5, 4],
                "segmentation": {"size": [H, W], "counts": compressed["counts"].decode("ascii")},
            },
            {
                "id": 4,
                "image_id": 10,
                "category_id": 1,
                "iscrowd": 1,
                "area": 16.0,
                "bbox": [0, 8, 4, 4],
                "segmentation": {"size": [H, W], "counts": crowd_rle["counts"].decode("ascii")},
            },
        ],
    }


def _write(tmp_path: Path, edit: Callable[[dict], None] | None = None) -> Path:
    """Write the tiny dataset (optionally edited) and its images; returns the json path."""
    data = _dataset_dict()
    if edit is not None:
        edit(data)
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    rgb[..., 0] = np.arange(W, dtype=np.uint8)[None] * 10  # red encodes the column
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.new("L", (12, 10), 77).save(tmp_path / "b.png")  # greyscale on purpose
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_masks_boxes_labels_for_each_segmentation_format(tmp_path: Path) -> None:
    ds = CocoInstances(_write(tmp_path), tmp_path)
    image, target = ds[0]
    assert target["image_id"] == 10
    assert image.dtype == torch.uint8 and image.shape == (3, H, W)
    assert image[0, 5, 7] == 70  # RGB order and no transpose
    # Crowd annotation 4 is excluded: three targets remain.
    assert target["masks"].dtype == torch.uint8
    np.testing.assert_array_equal(target["masks"].numpy(), _expected_masks())
    assert target["labels"].tolist() == [0, 1, 2]  # ids 1, 5, 90 -> contiguous 0, 1, 2
    assert target["labels"].dtype == torch.int64
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[2, 2, 8, 6], [12, 3, 13, 8], [14, 10, 19, 14]]
    assert target["orig_size"] == target["size"] == (H, W)


def test_image_without_annotations_is_kept_with_empty_target(tmp_path: Path) -> None:
    ds = CocoInstances(_write(tmp_path), tmp_path)
    assert ds.image_ids == [10, 20] and len(ds) == 2
    image, target = ds[1]
    assert image.shape == (3, 10, 12) and bool((image == 77).all())
    assert target["boxes"].shape == (0, 4)
    assert target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 10, 12)


def test_label_mapping_round_trips(tmp_path: Path) -> None:
    ds = CocoInstances(_write(tmp_path), tmp_path)
    assert ds.category_ids == [1, 5, 90]
    assert ds.category_names == ["a", "b", "c"]
    assert ds.num_classes == 3
    assert ds.label_to_category_id(torch.tensor([2, 0, 1])) == [90, 1, 5]


def test_empty_rasterised_mask_is_dropped_and_counted(tmp_path: Path) -> None:
    def collinear(data: dict) -> None:
        data["annotations"][0]["segmentation"] = [[1, 1, 2, 2, 3, 3]]

    ds = CocoInstances(_write(tmp_path, collinear), tmp_path)
    _, target = ds[0]
    _, target = ds[0]  # a second epoch must not count it again
    assert target["labels"].tolist() == [1, 2]
    assert ds.num_dropped_empty == 1


def test_transforms_run_and_size_is_updated(tmp_path: Path) -> None:
    def crop(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        return image[:, :8, :8], target

    _, target = CocoInstances(_write(tmp_path), tmp_path, transforms=crop)[0]
    assert target["size"] == (8, 8) and target["orig_size"] == (H, W)


def _bad_category(data: dict) -> None:
    data["annotations"][1]["category_id"] = 3


def _bad_polygon(data: dict) -> None:
    data["annotations"][0]["segmentation"] = [[2, 2, 8, 2]]


def _empty_segmentation(data: dict) -> None:
    data["annotations"][2]["segmentation"] = []


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (_bad_category, ["annotation id 2", "category id 3", "instances.json"]),
        (_bad_polygon, ["annotation id 1", "image id 10", "instances.json", "polygon"]),
        (_empty_segmentation, ["annotation id 3", "image id 10", "instances.json", "empty"]),
    ],
)
def test_bad_annotations_fail_at_construction(
    tmp_path: Path, edit: Callable[[dict], None], needles: list[str]
) -> None:
    path = _write(tmp_path, edit)
    with pytest.raises(DatasetError) as info:
        CocoInstances(path, tmp_path)
    for needle in needles:
        assert needle in str(info.value)


def test_missing_image_fails_at_construction(tmp_path: Path) -> None:
    path = _write(tmp_path)
    (tmp_path / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"b\.png.*image id 20"):
        CocoInstances(path, tmp_path)


def test_corrupt_image_fails_on_read(tmp_path: Path) -> None:
    path = _write(tmp_path)
    (tmp_path / "a.png").write_bytes(b"this is not a png")
    ds = CocoInstances(path, tmp_path)  # existence is all construction checks
    with pytest.raises(DatasetError, match=r"a\.png.*image id 10"):
        ds[0]


def test_missing_annotation_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope\.json"):
        CocoInstances(tmp_path / "nope.json", tmp_path)
