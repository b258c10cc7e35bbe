"""Synthetic COCO-format instance-segmentation dataset ("shapes").

The workbench's embedded default dataset (docs/architecture.md#data-flow): small images of
randomly coloured, rotated, overlapping shapes on textured backgrounds, written as standard COCO
json + PNG files so that the same loader, codecs and COCOeval path run on it as on real COCO.

Properties the rest of the project relies on:
- masks are not boxes (circles, stars, rings, ...), so the mask codec and mask AP mean something;
- instances cover COCO's small/medium/large ranges scaled to the image side (see
  :func:`scaled_area_thresholds`) when ``[min_object_frac, max_object_frac]`` allows it;
- occlusion is exact: every painted object pixel belongs to exactly one annotated instance, whose
  annotation is its visible mask;
- output is byte-identical for a given seed;
- it writes only into a missing or empty folder, or one holding its own ``synth_params.json``
  (:data:`MARKER`), so a user's dataset is never overwritten (docs/own-data.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from istr.config import SynthConfig
from istr.data.checks import DatasetError
from istr.io import ForeignFolderError, atomic_write_text, claim_output_folder

# A shape is a list of (polygon in unit coordinates inside the unit disc, fill value); fill 0
# cuts a hole (ring).
Parts = list[tuple[np.ndarray, int]]

MIN_VISIBLE_FRAC = 0.3  # an instance must keep >= 30% of its full area visible ...
MIN_VISIBLE_PIXELS = 20  # ... and at least this many pixels
TRIES_PER_INSTANCE = 10  # rejected placements are redrawn, up to this many times per instance
COLOUR_TRIES = 10
MIN_CONTRAST = 90.0  # Euclidean RGB distance between object colour and the background under it
SHADE_AMPLITUDE = 35.0  # per-object linear shading, so one flat colour does not identify it
GRAIN_STD = 6.0  # fine noise over the whole image
MARKER = "synth_params.json"  # the generator's parameters; its presence marks a folder the generator made


class NotOurFolderError(DatasetError):
    """The output folder holds files the generator did not write."""


def _unit_circle(k: int, rx: float = 1.0, ry: float = 1.0) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, k, endpoint=False)
    return np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)


def _polar(angles: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _circle(rng: np.random.Generator) -> Parts:
    return [(_unit_circle(48), 1)]


def _ellipse(rng: np.random.Generator) -> Parts:
    return [(_unit_circle(48, 1.0, rng.uniform(0.4, 0.75)), 1)]


def _triangle(rng: np.random.Generator) -> Parts:
    # Jittered vertex angles/radii give non-equilateral triangles.
    angles = np.deg2rad(np.array([90.0, 210.0, 330.0]) + rng.uniform(-20.0, 20.0, 3))
    return [(_polar(angles, rng.uniform(0.75, 1.0, 3)), 1)]


def _star(rng: np.random.Generator) -> Parts:
    points = int(rng.integers(5, 7))
    angles = np.linspace(0.0, 2.0 * np.pi, 2 * points, endpoint=False)
    radii = np.tile([1.0, rng.uniform(0.38, 0.55)], points)
    return [(_polar(angles, radii), 1)]


def _ring(rng: np.random.Generator) -> Parts:
    inner = rng.uniform(0.45, 0.65)
    return [(_unit_circle(48), 1), (_unit_circle(48, inner, inner), 0)]


def _hexagon(rng: np.random.Generator) -> Parts:
    return [(_unit_circle(6), 1)]


def _irregular_polygon(rng: np.random.Generator) -> Parts:
    k = int(rng.integers(7, 11))
    angles = np.sort(rng.uniform(0.0, 2.0 * np.pi, k))
    return [(_polar(angles, rng.uniform(0.45, 1.0, k)), 1)]


# Category id = position + 1; the order is part of the dataset's identity.
SHAPES: dict[str, Callable[[np.random.Generator], Parts]] = {
    "circle": _circle,
    "ellipse": _ellipse,
    "triangle": _triangle,
    "star": _star,
    "ring": _ring,
    "hexagon": _hexagon,
    "polygon": _irregular_polygon,
}


def scaled_area_thresholds(image_size: int) -> tuple[float, float]:
    """COCO's small/medium and medium/large limits (32^2, 96^2 at 640 px) scaled to the image."""
    scale = image_size / 640.0
    return (32.0 * scale) ** 2, (96.0 * scale) ** 2


def _rasterize(parts: Parts, center: np.ndarray, radius: float, angle: float, size: int) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    for points, fill in parts:
        xy = points @ rotation.T * radius + center
        draw.polygon(xy.ravel().tolist(), fill=fill)
    return np.asarray(canvas, dtype=bool)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    # A coarse random colour grid upsampled bicubically = smooth colour gradients/blobs.
    cells = int(rng.integers(2, 6))
    grid = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    smooth = Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(smooth, dtype=np.float32).copy()


def _pick_colour(rng: np.random.Generator, local_mean: np.ndarray) -> np.ndarray:
    # First random colour that contrasts with what lies underneath, else the most contrasting one.
    candidates = rng.integers(0, 256, (COLOUR_TRIES, 3)).astype(np.float32)
    distance = np.linalg.norm(candidates - local_mean, axis=1)
    good = np.flatnonzero(distance >= MIN_CONTRAST)
    return candidates[good[0] if good.size else int(distance.argmax())]


def _keeps_others_visible(candidate: np.ndarray, visible: list[np.ndarray], full_areas: list[int]) -> bool:
    for mask, full in zip(visible, full_areas, strict=True):
        remaining = np.count_nonzero(mask & ~candidate)
        if remaining < max(MIN_VISIBLE_FRAC * full, MIN_VISIBLE_PIXELS):
            return False
    return True


def _paint(
    canvas: np.ndarray,
    mask: np.ndarray,
    colour: np.ndarray,
    center: np.ndarray,
    radius: float,
    rng: np.random.Generator,
) -> None:
    ys, xs = np.nonzero(mask)
    phi = rng.uniform(0.0, 2.0 * np.pi)
    shade = rng.uniform(-SHADE_AMPLITUDE, SHADE_AMPLITUDE)
    ramp = ((xs - center[0]) * np.cos(phi) + (ys - center[1]) * np.sin(phi)) / radius
    canvas[ys, xs] = colour + (shade * ramp)[:, None]


def _render_image(
    rng: np.random.Generator, size: int, num_instances: int, min_frac: float, max_frac: float
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Returns the RGB image and ``(category_id, visible_mask)`` per instance, bottom to top.

    Placement is checked before painting (a candidate that would hide too much of an earlier
    instance is redrawn), so no painted object is ever left unannotated.
    """
    canvas = _background(rng, size)
    names = list(SHAPES)
    visible: list[np.ndarray] = []
    full_areas: list[int] = []
    categories: list[int] = []
    for _ in range(num_instances * TRIES_PER_INSTANCE):
        if len(visible) == num_instances:
            break
        category = int(rng.integers(len(names)))
        parts = SHAPES[names[category]](rng)
        # Log-uniform size: COCO's area ranges are geometric, so this spreads s/m/l evenly.
        radius = 0.5 * size * float(np.exp(rng.uniform(np.log(min_frac), np.log(max_frac))))
        # Keep the shape inside the image when it fits; centre it roughly otherwise.
        low, high = sorted((radius, size - radius))
        center = rng.uniform(low, high, 2)
        mask = _rasterize(parts, center, radius, rng.uniform(0.0, 2.0 * np.pi), size)
        area = int(np.count_nonzero(mask))
        if area < MIN_VISIBLE_PIXELS or not _keeps_others_visible(mask, visible, full_areas):
            continue
        colour = _pick_colour(rng, canvas[mask].mean(axis=0))
        _paint(canvas, mask, colour, center, radius, rng)
        visible = [m & ~mask for m in visible] + [mask]
        full_areas.append(area)
        categories.append(category + 1)
    canvas += rng.normal(0.0, GRAIN_STD, canvas.shape).astype(np.float32)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return image, list(zip(categories, visible, strict=True))


def _annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": {
            "size": [int(s) for s in rle["size"]],
            "counts": rle["counts"].decode("ascii"),
        },
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
    }


def _generate_split(
    out_dir: Path,
    split: str,
    num_images: int,
    seed_seq: np.random.SeedSequence,
    image_size: int,
    instances: tuple[int, int],
    fracs: tuple[float, float],
    categories: list[dict],
    seed: int,
) -> dict:
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    small_max, medium_max = scaled_area_thresholds(image_size)
    images, annotations = [], []
    sizes = {"small": 0, "medium": 0, "large": 0}
    # One child stream per image: image i does not depend on how many images are generated.
    for index, image_seq in enumerate(seed_seq.spawn(num_images)):
        rng = np.random.default_rng(image_seq)
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        count = int(rng.integers(instances[0], instances[1] + 1))
        pixels, instance_masks = _render_image(rng, image_size, count, *fracs)
        Image.fromarray(pixels).save(image_dir / file_name, format="PNG")
        images.append({"id": image_id, "file_name": file_name, "height": image_size, "width": image_size})
        for category_id, mask in instance_masks:
            ann = _annotation(len(annotations) + 1, image_id, category_id, mask)
            annotations.append(ann)
            area = ann["area"]
            sizes["small" if area < small_max else "medium" if area < medium_max else "large"] += 1
    dataset = {
        "info": {
            "description": f"istr synthetic shapes ({split})",
            "seed": seed,
            "image_size": image_size,
        },
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    atomic_write_text(annotation_path(out_dir, split), json.dumps(dataset))
    return {"images": len(images), "instances": len(annotations), **sizes}


def annotation_path(out_dir: Path, split: str) -> Path:
    """Where the generator writes ``split``'s json; written last, so it marks a complete split."""
    return Path(out_dir) / "annotations" / f"instances_{split}.json"


def is_generated(folder: Path) -> bool:
    """True when ``folder`` was made by :func:`generate_synthetic_coco` (it holds :data:`MARKER`)."""
    return (Path(folder) / MARKER).is_file()


def claim_folder(out_dir: Path, params: dict) -> None:
    """Refuse a folder with files the generator did not write; else record ``params`` in :data:`MARKER`."""
    try:
        claim_output_folder(out_dir, "the synthetic dataset's folder", MARKER, json.dumps(params))
    except ForeignFolderError as err:
        raise NotOurFolderError(str(err)) from None


def generate_synthetic_coco(
    out_dir: Path,
    num_train: int,
    num_val: int,
    seed: int = SynthConfig.seed,
    image_size: int = SynthConfig.image_size,
    min_instances: int = SynthConfig.min_instances,
    max_instances: int = SynthConfig.max_instances,
    min_object_frac: float = SynthConfig.min_object_frac,
    max_object_frac: float = SynthConfig.max_object_frac,
) -> dict:
    """Write a synthetic shapes dataset in COCO format under ``out_dir``.

    The defaults are ``data.synth``'s (:class:`istr.config.SynthConfig`), so a call and a config agree.

    Layout: ``images/{train,val}/NNNNNN.png`` and ``annotations/instances_{train,val}.json``
    (image ids start at 1 in each split; category ids 1..7 in :data:`SHAPES` order; segmentation
    is compressed RLE of the visible mask). An object's diameter is ``frac * image_size`` with
    ``frac`` log-uniform in ``[min_object_frac, max_object_frac]``. The jsons are written last
    and atomically, so their presence marks a complete split.

    Returns ``{"num_categories": C, "train": counts, "val": counts}`` where counts holds
    ``images``, ``instances`` and ``small``/``medium``/``large`` instance counts.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train}, {num_val}")
    if not 0 <= min_instances <= max_instances:
        raise ValueError(f"need 0 <= min_instances <= max_instances, got {min_instances}, {max_instances}")
    if not 0.0 < min_object_frac <= max_object_frac <= 1.0:
        raise ValueError(f"need 0 < min_object_frac <= max_object_frac <= 1, got {min_object_frac}, {max_object_frac}")
    out_dir = Path(out_dir)
    claim_folder(out_dir, {
        "num_train": num_train, "num_val": num_val, "image_size": image_size, "min_instances": min_instances,
        "max_instances": max_instances, "min_object_frac": min_object_frac, "max_object_frac": max_object_frac,
        "seed": seed,
    })
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)]
    # Independent derived streams, so train and val never share images.
    train_seq, val_seq = np.random.SeedSequence(seed).spawn(2)
    common = {
        "image_size": image_size,
        "instances": (min_instances, max_instances),
        "fracs": (min_object_frac, max_object_frac),
        "categories": categories,
        "seed": seed,
    }
    return {
        "num_categories": len(categories),
        "train": _generate_split(out_dir, "train", num_train, train_seq, **common),
        "val": _generate_split(out_dir, "val", num_val, val_seq, **common),
    }
