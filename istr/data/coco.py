"""COCO-format instance-segmentation dataset on pycocotools.

Target convention (the contract with transforms, collate, matcher and criterion):
``boxes`` float32 [n,4] absolute x1,y1,x2,y2; ``labels`` int64 [n] contiguous in
``range(num_classes)`` (``category_ids[label]`` is the COCO id); ``masks`` uint8 [n,H,W] in {0,1};
``image_id`` int; ``orig_size`` and ``size`` (H, W) int tuples before / after transforms.
Crowd annotations are not targets (as in DETR / Sparse R-CNN); they stay in the json, where
COCOeval uses them to ignore detections.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from istr.data.checks import DatasetError, check_records, split_key

__all__ = ["CocoInstances", "DatasetError"]  # DatasetError's home is istr.data.checks

Transform = Callable[[Tensor, dict], tuple[Tensor, dict]]


def _load_coco(annotation_file: Path) -> COCO:
    if not annotation_file.is_file():
        raise DatasetError(
            f"annotation file {annotation_file} does not exist; pass the path of a COCO instances "
            "json (e.g. one written by istr.data.synth.generate_synthetic_coco)"
        )
    try:
        # pycocotools prints progress on every load; keep the console for our own logs.
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(annotation_file))
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise DatasetError(
            f"{annotation_file} is not a readable COCO instances json ({type(e).__name__}: {e}); "
            "fix or regenerate the file"
        ) from e


def _tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


class CocoInstances(Dataset):
    """Images and instance targets of one COCO instances json (see module docstring for targets).

    ``image_ids`` lists every image, annotated or not (images without instances still teach the
    classifier "no object"). With ``validate`` the json and the image files are checked at
    construction, so a bad record fails before training starts rather than mid-epoch; ``split``
    ('train' / 'val'), when given, names its ``data.<split>_*`` keys in those errors.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        transforms: Transform | None = None,
        validate: bool = True,
        split: str | None = None,
    ) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self.split = split
        self.transforms = transforms
        self.coco = _load_coco(self.annotation_file)
        categories = sorted(self.coco.cats.values(), key=lambda c: c["id"])
        self.category_ids: list[int] = [c["id"] for c in categories]
        self.category_names: list[str] = [c["name"] for c in categories]
        self.num_classes = len(categories)
        self._label_of = {cid: label for label, cid in enumerate(self.category_ids)}
        self.image_ids: list[int] = sorted(self.coco.imgs)
        # A set, so re-reading an image (next epoch) does not count its empty masks twice.
        self.dropped_empty_ann_ids: set[int] = set()
        if validate:
            self._validate()

    @property
    def num_dropped_empty(self) -> int:
        """Annotations seen so far (in this process) whose mask rasterised to zero pixels."""
        return len(self.dropped_empty_ann_ids)

    def label_to_category_id(self, labels: Sequence[int] | Tensor) -> list[int]:
        """Map contiguous labels back to COCO category ids (for results json / COCOeval)."""
        return [self.category_ids[int(label)] for label in labels]

    def _validate(self) -> None:
        check_records(self.coco, self.annotation_file, self.image_dir, self.split)
        missing = [i for i in self.image_ids if not os.path.exists(self._image_path(i))]
        if missing:
            raise DatasetError(
                f"image file {self._image_path(missing[0])} (image id {missing[0]}, listed in "
                f"{self.annotation_file}) does not exist ({len(missing)} of {len(self.image_ids)} images missing); "
                f"check {split_key(self.split, 'images')} or the images' file_name"
            )

    def _image_path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def _load_image(self, image_id: int) -> Tensor:
        path = self._image_path(image_id)
        try:
            with Image.open(path) as img:
                rgb = np.array(img.convert("RGB"))  # greyscale / RGBA / palette -> RGB
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unreadable files
            raise DatasetError(
                f"cannot read image {path} (image id {image_id} in {self.annotation_file}): {e}; "
                "replace or regenerate the file"
            ) from e
        info = self.coco.imgs[image_id]
        if rgb.shape[:2] != (info["height"], info["width"]):
            raise DatasetError(
                f"image {path} is {rgb.shape[0]}x{rgb.shape[1]} but image id {image_id} in "
                f"{self.annotation_file} says {info['height']}x{info['width']}; "
                "fix the json or the file"
            )
        return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        image_id = self.image_ids[index]
        image = self._load_image(image_id)
        height, width = image.shape[-2:]
        boxes, labels, masks = [], [], []
        # .get: imgToAnns is a defaultdict and indexing would grow it.
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            mask = self.coco.annToMask(ann)  # polygons, uncompressed and compressed RLE
            if not mask.any():
                self.dropped_empty_ann_ids.add(ann["id"])
                continue
            x, y, w, h = ann["bbox"] if "bbox" in ann else mask_utils.toBbox(self.coco.annToRLE(ann))
            box = [
                min(max(x, 0.0), width),
                min(max(y, 0.0), height),
                min(max(x + w, 0.0), width),
                min(max(y + h, 0.0), height),
            ]
            if box[2] <= box[0] or box[3] <= box[1]:
                box = _tight_box(mask)  # degenerate json box: the mask is the better witness
            boxes.append(box)
            labels.append(self._label_of[ann["category_id"]])
            masks.append(mask)
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8),
            "image_id": int(image_id),
            "orig_size": (int(height), int(width)),
            "size": (int(height), int(width)),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        target["size"] = (int(image.shape[-2]), int(image.shape[-1]))
        return image, target
