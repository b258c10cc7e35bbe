"""Synthetic shapes generator: determinism, COCO validity, occlusion and size coverage."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from istr.cli import build_parser
from istr.config import SynthConfig
from istr.data.synth import generate_synthetic_coco, scaled_area_thresholds

IMAGE_SIZE = 128


def _generate(out: Path, seed: int, num_train: int = 4, num_val: int = 2) -> dict:
    return generate_synthetic_coco(
        out, num_train=num_train, num_val=num_val, seed=seed, image_size=IMAGE_SIZE
    )


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("shapes")
    summary = _generate(root, seed=0, num_train=20, num_val=3)
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    return root, summary, coco


def _decoded(ann: dict) -> np.ndarray:
    return mask_utils.decode(ann["segmentation"]).astype(bool)


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    _generate(tmp_path / "a", seed=3)
    _generate(tmp_path / "b", seed=3)
    _generate(tmp_path / "c", seed=4)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert len(a) == 4 + 2 + 2 + 1  # images, jsons, synth_params.json
    assert a == b
    assert a.keys() == c.keys()
    assert a["annotations/instances_train.json"] != c["annotations/instances_train.json"]
    assert a["images/train/000001.png"] != c["images/train/000001.png"]


def test_train_and_val_use_different_streams(dataset: tuple[Path, dict, dict]) -> None:
    root, _, _ = dataset
    train = (root / "images" / "train" / "000001.png").read_bytes()
    val = (root / "images" / "val" / "000001.png").read_bytes()
    assert train != val


def test_coco_structure_and_summary(dataset: tuple[Path, dict, dict]) -> None:
    root, summary, coco = dataset
    cats = coco["categories"]
    assert len(cats) >= 6
    assert [c["id"] for c in cats] == list(range(1, len(cats) + 1))
    assert len({c["name"] for c in cats}) == len(cats)
    assert summary["train"]["images"] == len(coco["images"]) == 20
    assert summary["train"]["instances"] == len(coco["annotations"])
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=21)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 8
    for info in coco["images"][:3]:
        with Image.open(root / "images" / "train" / info["file_name"]) as img:
            assert img.size == (info["width"], info["height"]) == (IMAGE_SIZE, IMAGE_SIZE)
            assert img.mode == "RGB"
    assert all(
        a["iscrowd"] == 0 and isinstance(a["segmentation"]["counts"], str)
        for a in coco["annotations"]
    )


def test_area_and_bbox_match_the_visible_mask(dataset: tuple[Path, dict, dict]) -> None:
    _, _, coco = dataset
    for ann in coco["annotations"]:
        mask = _decoded(ann)
        ys, xs = np.nonzero(mask)
        assert ann["area"] == mask.sum()
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["area"] >= 20


def test_masks_are_not_boxes(dataset: tuple[Path, dict, dict]) -> None:
    _, _, coco = dataset
    fill = {}
    for ann in coco["annotations"]:
        *_, w, h = ann["bbox"]
        fill.setdefault(ann["category_id"], []).append(ann["area"] / (w * h))
    assert len(fill) >= 5  # most shape classes appear in 20 images
    assert np.mean([f for fs in fill.values() for f in fs]) < 0.8
    circle_id = next(c["id"] for c in coco["categories"] if c["name"] == "circle")
    assert np.median(fill.get(circle_id, [0.0])) < 0.9  # pi/4 for an unoccluded disc


def test_visible_masks_do_not_overlap(dataset: tuple[Path, dict, dict]) -> None:
    _, _, coco = dataset
    coverage = {}
    for ann in coco["annotations"]:
        mask = _decoded(ann).astype(np.int32)
        coverage[ann["image_id"]] = coverage.get(ann["image_id"], 0) + mask
    assert max(int(c.max()) for c in coverage.values()) == 1


def test_several_coco_size_ranges_occur(dataset: tuple[Path, dict, dict]) -> None:
    _, _, coco = dataset
    small_max, medium_max = scaled_area_thresholds(IMAGE_SIZE)
    assert small_max == pytest.approx(6.4**2)
    ranges = {
        "s" if a["area"] < small_max else "m" if a["area"] < medium_max else "l"
        for a in coco["annotations"]
    }
    assert len(ranges) >= 2


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="min_object_frac"):
        generate_synthetic_coco(tmp_path, 1, 1, min_object_frac=0.5, max_object_frac=0.1)
    with pytest.raises(ValueError, match="min_instances"):
        generate_synthetic_coco(tmp_path, 1, 1, min_instances=3, max_instances=2)


def test_the_generator_and_istr_synth_take_their_defaults_from_the_config() -> None:
    cfg = SynthConfig()
    params = inspect.signature(generate_synthetic_coco).parameters
    keys = ("seed", "image_size", "min_instances", "max_instances", "min_object_frac", "max_object_frac")
    assert {k: params[k].default for k in keys} == {k: getattr(cfg, k) for k in keys}
    args = build_parser().parse_args(["synth", "--out", "x"])
    given = (args.train, args.val, args.seed, args.size, args.min_instances, args.max_instances)
    assert given == (cfg.num_train, cfg.num_val, cfg.seed, cfg.image_size, cfg.min_instances, cfg.max_instances)
