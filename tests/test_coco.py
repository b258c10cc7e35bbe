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

from istr.data.checks import check_records
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


def test_missing_image_names_the_image_folder_key(tmp_path: Path) -> None:
    path = _write(tmp_path)
    (tmp_path / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"check data\.train_images / data\.val_images or"):
        CocoInstances(path, tmp_path)  # the split is not known here: both keys
    with pytest.raises(DatasetError, match=r"check data\.val_images or"):
        CocoInstances(path, tmp_path, split="val")


def _duplicate_image_id(data: dict) -> None:
    data["images"][1]["id"] = 10  # b.png's record would replace a.png's, and a.png's masks be drawn onto b.png


def _duplicate_annotation_id(data: dict) -> None:
    data["annotations"][2]["id"] = 1  # COCOeval would see annotation 3 twice and annotation 1 never


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (_duplicate_image_id, ["instances.json", "image ids 10 ", "'images'"]),
        (_duplicate_annotation_id, ["instances.json", "annotation ids 1 ", "'annotations'"]),
    ],
)
def test_duplicate_ids_fail_naming_json_and_ids(
    tmp_path: Path, edit: Callable[[dict], None], needles: list[str]
) -> None:
    with pytest.raises(DatasetError) as info:
        CocoInstances(_write(tmp_path, edit), tmp_path)
    for needle in needles:
        assert needle in str(info.value)
    assert "RLE size" not in str(info.value)  # not blamed on a mask


def _no_annotations(data: dict) -> None:
    data["annotations"] = []


def _crowd_only(data: dict) -> None:
    data["annotations"] = [data["annotations"][3]]


def _all_outside(data: dict) -> None:
    data["annotations"] = [data["annotations"][0]]
    data["annotations"][0]["segmentation"] = [[30, 2, 38, 2, 38, 6, 30, 6]]  # right of the 20 px wide image


@pytest.mark.parametrize(("edit", "why"), [
    (_no_annotations, "'annotations' is empty"),
    (_crowd_only, "every annotation is a crowd region (iscrowd=1)"),
    (_all_outside, "none of its 1 non-crowd annotations has mask pixels inside its image"),
])
def test_split_without_usable_annotations_fails_naming_the_json(
    tmp_path: Path, edit: Callable[[dict], None], why: str
) -> None:
    path = _write(tmp_path, edit)
    with pytest.raises(DatasetError) as info:
        CocoInstances(path, tmp_path)
    assert f"{path} has no usable annotations ({why})" in str(info.value)
    assert "data.train_json / data.val_json" in str(info.value)
    with pytest.raises(DatasetError, match=r"point data\.train_json at"):
        CocoInstances(path, tmp_path, split="train")


def _record_height_wrong(data: dict) -> None:
    data["images"][0]["height"] = H + 2  # a.png and the RLE masks of its annotations are H high


def test_wrong_image_size_blamed_on_the_image_record(tmp_path: Path) -> None:
    path = _write(tmp_path, _record_height_wrong)
    with pytest.raises(DatasetError) as info:
        CocoInstances(path, tmp_path)  # the file's header agrees with the RLE size
    message = str(info.value)
    assert f"image id 10 (file_name 'a.png') in {path}: the record's [height, width] [{H + 2}, {W}]" in message
    assert f"RLE size [{H}, {W}] of annotation ids 2, 3, 4 and with the image file's size" in message
    assert "fix the image record's 'height'/'width'" in message and "remove this annotation" not in message
    coco = CocoInstances(path, tmp_path, validate=False).coco
    with pytest.raises(DatasetError, match=r"image id 10 .*RLE size \[16, 20\] of all its annotations \(2, 3, 4\)"):
        check_records(coco, path)  # no file to read: three annotations agreeing outvote the record


def test_one_rle_of_another_size_is_blamed_on_its_annotation(tmp_path: Path) -> None:
    def other_size(data: dict) -> None:
        data["annotations"][1]["segmentation"]["size"] = [H, W + 1]

    with pytest.raises(DatasetError, match=r"annotation id 2 .*RLE size \[16, 21\].*remove this annotation"):
        CocoInstances(_write(tmp_path, other_size), tmp_path)


def test_dropped_and_clipped_annotations_are_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def off_image(data: dict) -> None:
        data["annotations"][0]["segmentation"] = [[-10, 2, -2, 2, -2, 6, -10, 6]]  # left of the image
        data["annotations"][1]["segmentation"]["counts"] = [H * W]  # RLE with no foreground run
        clipped = {**data["annotations"][0], "id": 5, "segmentation": [[15, 10, 25, 10, 25, 14, 15, 14]]}
        data["annotations"].append(clipped)  # crosses the right edge (W = 20)

    path = _write(tmp_path, off_image)
    with caplog.at_level("WARNING", logger="istr.data.checks"):
        ds = CocoInstances(path, tmp_path)
        CocoInstances(path, tmp_path)  # the json is loaded again (check, then the loader): one warning
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert message.startswith(f"{path}: of 4 non-crowd annotations, ")
    assert "1 dropped: polygon entirely outside its image (annotation ids 1)" in message
    assert "1 dropped: RLE mask with no pixels (annotation ids 2)" in message
    assert "1 clipped: polygon partly outside its image, the part outside is cut off (annotation ids 5)" in message
    _, target = ds[0]
    assert ds.num_dropped_empty == 2 and len(target["labels"]) == 2  # the loader agrees: 3 and 5 remain


def test_corrupt_image_fails_on_read(tmp_path: Path) -> None:
    path = _write(tmp_path)
    (tmp_path / "a.png").write_bytes(b"this is not a png")
    ds = CocoInstances(path, tmp_path)  # existence is all construction checks
    with pytest.raises(DatasetError, match=r"a\.png.*image id 10"):
        ds[0]


def test_missing_annotation_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope\.json"):
        CocoInstances(tmp_path / "nope.json", tmp_path)
