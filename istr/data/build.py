"""Builders that read ``cfg.data`` and return datasets and loaders (docs/architecture.md#layers)."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from istr.data.checks import check_images
from istr.data.coco import CocoInstances, DatasetError
from istr.data.collate import collate_batch
from istr.data.sampler import ResumableBatchSampler, SeededSamples, ShapeGroupedBatchSampler, eval_padded_shapes
from istr.data.synth import (
    MARKER,
    NotOurFolderError,
    annotation_path,
    claim_folder,
    generate_synthetic_coco,
    is_generated,
)
from istr.data.transforms import RandomCrop, build_transforms
from istr.io import file_lock

log = logging.getLogger(__name__)
SPLITS = ("train", "val")


def split_paths(data_cfg, split: str) -> tuple[Path, Path]:
    """(annotation json, image folder) of ``split``, both relative to ``data.root``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {SPLITS}")
    root = Path(data_cfg.root)
    return root / getattr(data_cfg, f"{split}_json"), root / getattr(data_cfg, f"{split}_images")


def _synth_params(synth) -> dict:
    return {k: getattr(synth, k) for k in ("num_train", "num_val", "image_size", "min_instances",
                                           "max_instances", "min_object_frac", "max_object_frac", "seed")}


def generation_lock(root: Path) -> Path:
    """A lock file per dataset folder in the system's temp dir: nothing is written beside a user's folder."""
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"istr-synth-{digest}.lock"


def _claim_and_generate(root: Path, params: dict, synth, missing: list[str]) -> None:
    try:
        claim_folder(root, params)
    except NotOurFolderError as err:
        hint = f"; also check {', '.join(missing)} (not found under data.root)" if missing else ""
        raise DatasetError(f"data.synth.enabled is true but data.root: {err}. "
                           f"For your own dataset set data.synth.enabled=false{hint}") from None
    log.warning("generating a synthetic shapes dataset under %s (data.synth.enabled=true); "
                "for your own dataset set data.synth.enabled=false", root)
    generate_synthetic_coco(root, synth.num_train, synth.num_val, seed=synth.seed, image_size=synth.image_size,
                            min_instances=synth.min_instances, max_instances=synth.max_instances,
                            min_object_frac=synth.min_object_frac, max_object_frac=synth.max_object_frac)


def _generated_and_complete(root: Path) -> bool:
    return is_generated(root) and all(annotation_path(root, s).is_file() for s in SPLITS)


def ensure_dataset(data_cfg) -> None:
    """Make sure ``data.root`` holds a dataset; generate the synthetic one only where that is safe.

    Generation happens only with ``data.synth.enabled`` and a ``data.root`` that is missing, empty
    or made by the generator (docs/own-data.md). Any other folder is the user's: an error says to
    set ``data.synth.enabled=false`` rather than writing into it. A generated dataset made with other
    parameters is an error rather than silently reused.
    """
    root = Path(data_cfg.root)
    synth = data_cfg.synth
    if not synth.enabled:
        if not root.is_dir():
            raise DatasetError(f"data.root={root} does not exist; point data.root at your COCO-format dataset")
        return
    params = _synth_params(synth)
    if is_generated(root) and json.loads((root / MARKER).read_text()) != params:
        raise DatasetError(f"{root} was generated with {(root / MARKER).read_text().strip()}, not {params}; "
                           "delete it or point data.root elsewhere")
    missing = [f"data.{s}_json={getattr(data_cfg, f'{s}_json')}" for s in SPLITS
               if not split_paths(data_cfg, s)[0].is_file()]
    if not _generated_and_complete(root):
        # Processes started together (sweep cells, recipe variants) claim and generate once: the others wait
        # here, then find the jsons, which the generator writes last.
        with file_lock(generation_lock(root)):
            if not _generated_and_complete(root):
                _claim_and_generate(root, params, synth, missing)
    if missing := [s for s in SPLITS if not split_paths(data_cfg, s)[0].is_file()]:
        raise DatasetError(
            f"{', '.join(f'data.{s}_json' for s in missing)} names no file the generator writes; with "
            f"data.synth.enabled use {', '.join(str(annotation_path('', s)) for s in missing)} (relative to data.root)"
        )


def check_dataset(data_cfg, cache_dir: Path | None) -> None:
    """Every record and every image of both splits, before training (docs/own-data.md, "Validation").

    A missing json or image folder names its ``data.*`` key; other problems name the file and record.
    Cached under ``cache_dir`` by the json's hash and the image files' sizes; ``data.validate=false``
    keeps only the path checks.
    """
    for split in SPLITS:
        json_path, image_dir = split_paths(data_cfg, split)
        if not json_path.is_file():
            raise DatasetError(f"data.{split}_json: {json_path} does not exist (paths are relative to data.root)")
        if not image_dir.is_dir():
            raise DatasetError(f"data.{split}_images: {image_dir} is not a folder (paths are relative to data.root)")
        if not data_cfg.validate:
            continue
        dataset = CocoInstances(json_path, image_dir, validate=True, split=split)
        started = time.perf_counter()
        cached = check_images(dataset.coco, json_path, image_dir, cache_dir, split=split)
        log.info("%s split: %d images %s (%.1f s)", split, len(dataset), "checked before (cached)" if cached
                 else "decoded and checked", time.perf_counter() - started)


def build_dataset(data_cfg, split: str, train: bool) -> CocoInstances:
    json_path, image_dir = split_paths(data_cfg, split)
    if train:
        crop = data_cfg.crop
        transforms = build_transforms(
            True, list(data_cfg.train_short_sizes), data_cfg.train_max_size, data_cfg.flip_prob,
            None if crop.type == "none" else RandomCrop(crop.type, list(crop.size)), crop.prob,
            list(crop.pre_crop_sizes),
        )
    else:
        transforms = build_transforms(False, [data_cfg.test_short_size], data_cfg.test_max_size)
    return CocoInstances(json_path, image_dir, transforms=transforms, validate=data_cfg.validate, split=split)


def _collate(data_cfg) -> partial:
    return partial(collate_batch, size_divisibility=data_cfg.size_divisibility)


def build_train_loader(
    dataset: CocoInstances,
    data_cfg,
    batch_per_rank: int,
    seed: int,
    rank: int,
    world_size: int,
    start_step: int,
    pin_memory: bool,
) -> DataLoader:
    sampler = ResumableBatchSampler(len(dataset), batch_per_rank, seed, rank, world_size, start_step)
    return DataLoader(
        SeededSamples(dataset),
        batch_sampler=sampler,
        num_workers=data_cfg.num_workers,
        collate_fn=_collate(data_cfg),
        pin_memory=pin_memory,
        persistent_workers=data_cfg.num_workers > 0,
    )


def build_eval_loader(dataset: CocoInstances, data_cfg, batch_size: int) -> DataLoader:
    """Batches of images of one padded shape, so an image's detections do not depend on ``batch_size``
    (docs/method.md#evaluation); results come in shape-group order, which COCOeval does not mind."""
    shapes = eval_padded_shapes(dataset, data_cfg.test_short_size, data_cfg.test_max_size, data_cfg.size_divisibility)
    return DataLoader(
        dataset,
        batch_sampler=ShapeGroupedBatchSampler(shapes, batch_size),
        num_workers=data_cfg.num_workers,
        collate_fn=_collate(data_cfg),
        pin_memory=torch.cuda.is_available(),
    )
