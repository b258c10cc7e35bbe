"""Full check of one COCO split before training: every record and every image file (docs/own-data.md).

Record checks are cheap and run whenever a :class:`~istr.data.coco.CocoInstances` is built with
``validate``; the image check decodes every file (in threads: PIL releases the GIL while decoding)
and compares its size with the json. A split that passed is remembered in ``cache_dir`` under a
key made of the json's hash and every image file's size and mtime, so an unchanged dataset is
checked once. The first problem, in json order, is raised as a :class:`DatasetError` naming the
file, the record and the key to fix.
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from pycocotools.coco import COCO

from istr.io import atomic_write_json

CHECK_VERSION = 1  # bump when the checks change, so cached passes are redone


class DatasetError(ValueError):
    """Bad dataset input; the message names the file, the record and how to fix it."""


def _segmentation_problem(ann: dict, height: int, width: int) -> str | None:
    """Why ``ann['segmentation']`` cannot be rasterised, or None when it can."""
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        if not seg and not ann.get("iscrowd", 0):
            return "non-crowd annotation has an empty segmentation"
        for poly in seg:
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                size = len(poly) if isinstance(poly, list) else type(poly).__name__
                return f"degenerate polygon ({size} coordinates; need an even count >= 6)"
        return None
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            return "RLE segmentation lacks 'counts' or 'size'"
        if list(seg["size"]) != [height, width]:
            return f"RLE size {list(seg['size'])} differs from the image's {[height, width]}"
        return None
    return f"segmentation is {type(seg).__name__}, expected a list of polygons or an RLE dict"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _annotation_problem(ann: dict, height: int, width: int) -> str | None:
    """Why one annotation's ``bbox``/``area``/``iscrowd``/``segmentation`` is unusable, or None."""
    bbox = ann.get("bbox")
    if bbox is not None and not (
        isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox)) and bbox[2] >= 0 and bbox[3] >= 0
    ):
        return f"key 'bbox' is {bbox!r}; need [x, y, width, height] with finite numbers and width, height >= 0"
    area = ann.get("area")
    if area is not None and not (_is_number(area) and area >= 0):
        return f"key 'area' is {area!r}; need a finite number >= 0"
    if ann.get("iscrowd", 0) not in (0, 1):
        return f"key 'iscrowd' is {ann.get('iscrowd')!r}; need 0 or 1"
    problem = _segmentation_problem(ann, height, width)
    return f"key 'segmentation': {problem}" if problem else None


def _image_record_problem(info: dict) -> str | None:
    for key in ("height", "width"):
        if not (isinstance(info.get(key), int) and info[key] > 0):
            return f"key '{key}' is {info.get(key)!r}; need a positive integer"
    if not isinstance(info.get("file_name"), str) or not info["file_name"]:
        return f"key 'file_name' is {info.get('file_name')!r}; need the image's path relative to the image folder"
    return None


def check_records(coco: COCO, src: Path) -> None:
    """Every image and annotation record of ``coco`` (loaded from ``src``) is usable for training."""
    if not coco.cats:
        raise DatasetError(f"{src} defines no categories; add a 'categories' list")
    for image_id, info in coco.imgs.items():
        problem = _image_record_problem(info)
        if problem:
            raise DatasetError(f"image id {image_id} in {src}: {problem}; fix the image record")
    known = sorted(coco.cats)
    for ann in coco.anns.values():
        ann_id, image_id = ann.get("id"), ann.get("image_id")
        where = f"annotation id {ann_id} (image id {image_id}) in {src}"
        if image_id not in coco.imgs:
            raise DatasetError(
                f"{where} refers to an image id missing from 'images'; add the image record or remove the annotation"
            )
        if ann.get("category_id") not in coco.cats:
            raise DatasetError(
                f"{where} has category id {ann.get('category_id')}, not in 'categories' "
                f"(known ids {known}); fix the category_id or add the category"
            )
        info = coco.imgs[image_id]
        problem = _annotation_problem(ann, info["height"], info["width"])
        if problem:
            raise DatasetError(f"{where}: {problem}; fix or remove this annotation")


def _image_problem(path: Path, height: int, width: int) -> str | None:
    """Decode ``path`` fully (JPEGs at 1/8 scale: every byte is still read) and compare its size."""
    try:
        with Image.open(path) as img:
            size = img.size
            img.draft(img.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
            img.load()
    except FileNotFoundError:
        return "does not exist; check the image folder key or the record's 'file_name'"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's unreadable-file errors
        return f"cannot be decoded ({e}); replace the file or remove its record"
    if size != (width, height):
        return (f"is {size[1]}x{size[0]} (HxW) but the record says {height}x{width}; "
                "fix the record's 'height'/'width' or the file")
    return None


def _cache_key(json_path: Path, paths: list[Path]) -> str:
    digest = hashlib.sha256(f"v{CHECK_VERSION}\n".encode())
    digest.update(json_path.read_bytes())
    for path in paths:
        try:
            stat = path.stat()
            digest.update(f"{path.resolve()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\tmissing\n".encode())
    return digest.hexdigest()[:24]


def check_images(coco: COCO, src: Path, image_dir: Path, cache_dir: Path | None, workers: int = 8) -> bool:
    """Decode every image of ``coco`` and check its size; True when a cached pass made it unnecessary."""
    image_ids = sorted(coco.imgs)
    paths = [image_dir / coco.imgs[i]["file_name"] for i in image_ids]
    marker = None
    if cache_dir is not None:
        marker = Path(cache_dir) / "dataset_checks" / f"{_cache_key(src, paths)}.json"
        if marker.is_file():
            return True
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        records = [coco.imgs[i] for i in image_ids]
        problems = pool.map(lambda p, r: _image_problem(p, r["height"], r["width"]), paths, records)
        for image_id, path, problem in zip(image_ids, paths, problems):
            if problem:
                raise DatasetError(f"image file {path} (image id {image_id} in {src}) {problem}")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # the first problem is enough: stop decoding
    if marker is not None:
        atomic_write_json(marker, {"json": str(src), "image_dir": str(image_dir), "images": len(paths)})
    return False
