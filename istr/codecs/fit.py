"""Fit a codec on a dataset's training masks once, and cache it by dataset fingerprint + codec params.

docs/method.md#mask-embedding: each GT instance mask is cropped to its GT box and resized to 28x28.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor

from istr.codecs import CODECS, MASK_SIZE, MaskCodec, build_codec, load_codec
from istr.io import atomic_write_json
from istr.registry import pick
from istr.targets import crop_masks

log = logging.getLogger(__name__)


def box_crops(
    coco: COCO, mask_size: int = MASK_SIZE, max_masks: int = 0, seed: int = 0, image_ids: list[int] | None = None
) -> Tensor:
    """Box crops (S = ``mask_size``, the codecs' :data:`MASK_SIZE` by default) of the non-crowd instance masks of
    ``coco`` -> [n, S, S] in {0,1}.

    With ``max_masks > 0`` a seeded random subset of that many annotations is used.
    """
    ann_ids = coco.getAnnIds(imgIds=image_ids if image_ids is not None else [], iscrowd=False)
    if max_masks and len(ann_ids) > max_masks:
        ann_ids = sorted(np.random.default_rng(seed).choice(ann_ids, max_masks, replace=False).tolist())
    by_image: dict[int, list[dict]] = {}
    for ann in coco.loadAnns(ann_ids):
        if ann["bbox"][2] >= 1 and ann["bbox"][3] >= 1:
            by_image.setdefault(ann["image_id"], []).append(ann)
    crops = []
    for anns in by_image.values():
        rles = [coco.annToRLE(a) for a in anns]
        masks = torch.from_numpy(np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1)))
        x, y, w, h = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).unbind(1)
        crops.append(crop_masks(masks, torch.stack([x, y, x + w, y + h], 1), mask_size))
    return torch.cat(crops) if crops else torch.zeros((0, mask_size, mask_size))


def fingerprint(annotation_file: Path, codec_cfg) -> str:
    """Hash of the annotation file bytes and every codec parameter."""
    digest = hashlib.sha256(Path(annotation_file).read_bytes())
    params = {
        "type": codec_cfg.type,
        "dim": codec_cfg.dim,
        "mask_size": MASK_SIZE,  # kept in the hash: caches written before it became a constant stay valid
        "max_fit_masks": codec_cfg.max_fit_masks,
        "params": dict(codec_cfg.params),
    }
    if pick(CODECS, codec_cfg.type, "codec.type").standardize_codes:
        # Only these codecs' saved state changed when codes became standardised: other caches stay valid.
        params["codes"] = "standardized"
    digest.update(json.dumps(params, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def fit_codec(codec_cfg, coco: COCO, seed: int = 0) -> tuple[MaskCodec, dict[str, float]]:
    masks = box_crops(coco, MASK_SIZE, codec_cfg.max_fit_masks, seed)
    if masks.shape[0] == 0:
        raise ValueError("cannot fit a mask codec: the training set has no non-crowd instance masks")
    codec = build_codec(codec_cfg.type, codec_cfg.dim, **dict(codec_cfg.params))
    stats = codec.fit(masks)
    return codec, stats


def fit_or_load_codec(
    codec_cfg, annotation_file: Path, coco: COCO, cache_dir: Path, seed: int = 0
) -> tuple[MaskCodec, dict[str, float], Path]:
    """Load the cached codec for this dataset + codec config, fitting and caching it if missing."""
    key = fingerprint(annotation_file, codec_cfg)
    path = Path(cache_dir) / "codecs" / f"{codec_cfg.type}{codec_cfg.dim}-{key}.pt"
    stats_path = path.with_suffix(".json")
    if path.is_file() and stats_path.is_file():
        return load_codec(path), json.loads(stats_path.read_text()), path
    log.info("fitting %s codec (dim %d) on %s", codec_cfg.type, codec_cfg.dim, annotation_file)
    start = time.perf_counter()
    codec, stats = fit_codec(codec_cfg, coco, seed)
    stats = {**stats, "fit_seconds": time.perf_counter() - start}
    path.parent.mkdir(parents=True, exist_ok=True)
    codec.save(path)
    atomic_write_json(stats_path, stats)
    return codec, stats, path
