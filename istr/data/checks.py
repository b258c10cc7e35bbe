"""Full check of one COCO split before training: every record and every image file (docs/own-data.md).

Record checks are cheap and run whenever a :class:`~istr.data.coco.CocoInstances` is built with
``validate``; the image check decodes every file (in threads: PIL releases the GIL while decoding)
and compares its size with the json. A split that passed is remembered in ``cache_dir`` under a
key made of the json's hash and every image file's size and mtime, so an unchanged dataset is
checked once. The first problem, in json order, is raised as a :class:`DatasetError` naming the
file, the record and the key to fix. Annotations the loader will drop or clip are not errors: they
are counted and logged once per json.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from istr.io import atomic_write_json

CHECK_VERSION = 2  # bump when the checks change, so cached passes are redone

log = logging.getLogger(__name__)
_logged: set[str] = set()  # warnings already given: a json is validated by the check and again by each loader


class DatasetError(ValueError):
    """Bad dataset input; the message names the file, the record and how to fix it."""


def split_key(split: str | None, kind: str) -> str:
    """The config key of ``kind`` ('json' / 'images') for ``split``, or both splits' keys when it is unknown."""
    return f"data.{split}_{kind}" if split else f"data.train_{kind} / data.val_{kind}"


def _few(ids: list) -> str:
    """At most five ids for a one-line message."""
    more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
    return ", ".join(map(str, ids[:5])) + more


def _rle_size(seg: object) -> object:
    """An RLE's ``size`` as a list (None for polygons or no size), comparable with ``[height, width]``."""
    size = seg.get("size") if isinstance(seg, dict) else None
    return list(size) if isinstance(size, (list, tuple)) else size


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
            if not _finite_numbers(poly):
                return "polygon coordinates must be finite numbers"
        return None
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            return "RLE segmentation lacks 'counts' or 'size'"
        if _rle_size(seg) != [height, width]:
            return f"RLE size {_rle_size(seg)} differs from the image's {[height, width]}"
        return None
    return f"segmentation is {type(seg).__name__}, expected a list of polygons or an RLE dict"


def _finite_numbers(values: list) -> bool:
    # One C-level sum: a check per coordinate would add seconds on a COCO-sized json. A string, None or
    # list raises; nan or inf stays non-finite through the sum.
    try:
        return math.isfinite(sum(values))
    except (TypeError, OverflowError):
        return False


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


def _reject_duplicate_ids(records: list, kind: str, src: Path, why: str) -> None:
    # pycocotools' index keeps the last record of an id: a duplicate silently loses a record.
    counts = Counter(record["id"] for record in records)
    duplicated = [record_id for record_id, count in counts.items() if count > 1]
    if duplicated:
        raise DatasetError(
            f"{src}: {kind} ids {_few(duplicated)} each appear in more than one '{kind}s' record; "
            f"give every {kind} its own id ({why})"
        )


def _header_size(path: Path) -> list[int] | None:
    """[height, width] read from the file's header (nothing is decoded), or None when it cannot be opened."""
    try:
        with Image.open(path) as img:
            return [img.size[1], img.size[0]]
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def _record_size_problem(info: dict, anns: list[dict], image_dir: Path | None) -> str | None:
    """Why the image record's height/width, not its annotations, is wrong; None when the annotation is to blame.

    ``anns`` are the image's annotations. The file's header settles it when it matches one side;
    otherwise several RLE annotations that all carry one size other than the record's point at the record.
    """
    record = [info["height"], info["width"]]
    rle_sizes = [(ann.get("id"), _rle_size(ann["segmentation"])) for ann in anns
                 if isinstance(ann.get("segmentation"), dict)]
    disagreeing = [(ann_id, size) for ann_id, size in rle_sizes if size != record]
    if len({str(size) for _, size in disagreeing}) != 1:
        return None  # the annotations disagree among themselves: each is judged on its own
    rle = disagreeing[0][1]
    ids = _few([ann_id for ann_id, _ in disagreeing])
    on_file = _header_size(image_dir / info["file_name"]) if image_dir is not None else None
    if on_file == rle:
        return (f"the record's [height, width] {record} disagrees with the RLE size {rle} of annotation ids {ids} "
                f"and with the image file's size {on_file}")
    if on_file != record and len(disagreeing) >= 2 and len(disagreeing) == len(rle_sizes):
        return f"the record's [height, width] {record} disagrees with the RLE size {rle} of all its annotations ({ids})"
    return None


def _target_fate(seg: list | dict, height: int, width: int) -> str | None:
    """What the loader makes of a valid non-crowd segmentation: 'outside' or 'empty' (no mask pixels,
    so it is dropped), 'clipped' (a polygon crossing the image edge loses the part outside), or None."""
    if isinstance(seg, dict):
        counts = seg["counts"]
        if isinstance(counts, list) and _finite_numbers(counts):  # uncompressed: background, foreground runs
            pixels = sum(counts[1::2])
        elif isinstance(counts, (str, bytes)):
            pixels = int(mask_utils.area({"size": [height, width], "counts": counts}))
        else:
            return None
        return "empty" if pixels == 0 else None
    x0, x1 = min(min(poly[0::2]) for poly in seg), max(max(poly[0::2]) for poly in seg)
    y0, y1 = min(min(poly[1::2]) for poly in seg), max(max(poly[1::2]) for poly in seg)
    # pycocotools rasterises no pixel of a polygon on or beyond an edge (a conservative test: slivers
    # just inside may still rasterise empty and are then dropped when the image is read).
    if x1 <= 0 or x0 >= width or y1 <= 0 or y0 >= height:
        return "outside"
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        return "clipped"
    return None


_FATES = {
    "outside": "dropped: polygon entirely outside its image",
    "empty": "dropped: RLE mask with no pixels",
    "clipped": "clipped: polygon partly outside its image, the part outside is cut off",
}


def _log_fates(fates: dict[str, list], total: int, src: Path) -> None:
    """One warning per json (not per load) with how many non-crowd annotations are dropped or clipped, and why."""
    parts = [f"{len(ids)} {_FATES[fate]} (annotation ids {_few(ids)})" for fate, ids in fates.items() if ids]
    if not parts:
        return
    message = (f"{src}: of {total} non-crowd annotations, " + "; ".join(parts)
               + "; check them against their image's width and height")
    if message not in _logged:
        _logged.add(message)
        log.warning("%s", message)


def check_records(coco: COCO, src: Path, image_dir: Path | None = None, split: str | None = None) -> None:
    """Every image and annotation record of ``coco`` (loaded from ``src``) is usable for training.

    See docs/own-data.md, "Validation". ``image_dir`` lets the image file's header settle whether an
    image record or its RLE annotations carry the wrong size; ``split`` names its ``data.<split>_*``
    keys in messages (both splits' keys when None). Annotations the loader drops or clips are logged.
    """
    if not coco.cats:
        raise DatasetError(f"{src} defines no categories; add a 'categories' list")
    _reject_duplicate_ids(coco.dataset.get("images", []), "image", src, "annotations refer to images by id")
    _reject_duplicate_ids(coco.dataset.get("annotations", []), "annotation", src, "COCOeval looks them up by id")
    for image_id, info in coco.imgs.items():
        problem = _image_record_problem(info)
        if problem:
            raise DatasetError(f"image id {image_id} in {src}: {problem}; fix the image record")
    known = sorted(coco.cats)
    fates: dict[str, list] = {fate: [] for fate in _FATES}
    non_crowd = 0
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
        if _rle_size(ann.get("segmentation")) not in (None, [info["height"], info["width"]]):
            problem = _record_size_problem(info, coco.imgToAnns[image_id], image_dir)
            if problem:
                raise DatasetError(f"image id {image_id} (file_name {info['file_name']!r}) in {src}: {problem}; "
                                   "fix the image record's 'height'/'width'")
        problem = _annotation_problem(ann, info["height"], info["width"])
        if problem:
            raise DatasetError(f"{where}: {problem}; fix or remove this annotation")
        if not ann.get("iscrowd", 0):
            non_crowd += 1
            fate = _target_fate(ann["segmentation"], info["height"], info["width"])
            if fate:
                fates[fate].append(ann_id)
    if non_crowd == len(fates["outside"]) + len(fates["empty"]):
        # Without instances the train split cannot fit the mask codec and the val split's eval scores nothing.
        why = ("'annotations' is empty" if not coco.anns
               else "every annotation is a crowd region (iscrowd=1)" if not non_crowd
               else f"none of its {non_crowd} non-crowd annotations has mask pixels inside its image")
        raise DatasetError(
            f"{src} has no usable annotations ({why}); training needs instances in both splits: "
            f"add annotations or point {split_key(split, 'json')} at that split's instances json"
        )
    _log_fates(fates, non_crowd, src)


def _image_problem(path: Path, height: int, width: int, split: str | None) -> str | None:
    """Decode ``path`` fully (JPEGs at 1/8 scale: every byte is still read) and compare its size."""
    try:
        with Image.open(path) as img:
            size = img.size
            img.draft(img.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
            img.load()
    except FileNotFoundError:
        return f"does not exist; check {split_key(split, 'images')} or the record's 'file_name'"
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


def check_images(
    coco: COCO, src: Path, image_dir: Path, cache_dir: Path | None, workers: int = 8, split: str | None = None
) -> bool:
    """Decode every image of ``coco`` and check its size; True when a cached pass made it unnecessary.

    ``split`` names its ``data.<split>_images`` key in messages (both splits' keys when None).
    """
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
        problems = pool.map(lambda p, r: _image_problem(p, r["height"], r["width"], split), paths, records)
        for image_id, path, problem in zip(image_ids, paths, problems):
            if problem:
                raise DatasetError(f"image file {path} (image id {image_id} in {src}) {problem}")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # the first problem is enough: stop decoding
    if marker is not None:
        atomic_write_json(marker, {"json": str(src), "image_dir": str(image_dir), "images": len(paths)})
    return False
