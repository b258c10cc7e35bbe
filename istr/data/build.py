"""Builders that read ``cfg.data`` and return datasets and loaders (docs/architecture.md#layers)."""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from istr.data.coco import CocoInstances, DatasetError
from istr.data.collate import collate_batch
from istr.data.sampler import ResumableBatchSampler, SeededSamples
from istr.data.synth import generate_synthetic_coco
from istr.data.transforms import build_transforms
from istr.io import atomic_write_json

log = logging.getLogger(__name__)
SPLITS = ("train", "val")


def split_paths(data_cfg, split: str) -> tuple[Path, Path]:
    """(annotation json, image folder) of ``split``, both relative to ``data.root``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {SPLITS}")
    root = Path(data_cfg.root)
    return root / getattr(data_cfg, f"{split}_json"), root / getattr(data_cfg, f"{split}_images")


def ensure_dataset(data_cfg) -> None:
    """Generate the synthetic dataset under ``data.root`` when enabled and missing.

    The generator parameters are stored beside it; a dataset made with other parameters is an
    error rather than silently reused.
    """
    synth = data_cfg.synth
    if not synth.enabled:
        return
    params = {k: getattr(synth, k) for k in ("num_train", "num_val", "image_size", "min_instances",
                                             "max_instances", "min_object_frac", "max_object_frac", "seed")}
    marker = Path(data_cfg.root) / "synth_params.json"
    if all(split_paths(data_cfg, s)[0].is_file() for s in SPLITS):
        if marker.is_file() and json.loads(marker.read_text()) != params:
            raise DatasetError(f"{data_cfg.root} was generated with {marker.read_text().strip()}, not {params}; "
                               "delete it or point data.root elsewhere")
        return
    log.info("generating synthetic dataset under %s", data_cfg.root)
    generate_synthetic_coco(Path(data_cfg.root), synth.num_train, synth.num_val, seed=synth.seed,
                            image_size=synth.image_size, min_instances=synth.min_instances,
                            max_instances=synth.max_instances, min_object_frac=synth.min_object_frac,
                            max_object_frac=synth.max_object_frac)
    atomic_write_json(marker, params)


def build_dataset(data_cfg, split: str, train: bool) -> CocoInstances:
    json_path, image_dir = split_paths(data_cfg, split)
    if train:
        transforms = build_transforms(
            True, list(data_cfg.train_short_sizes), data_cfg.train_max_size, data_cfg.flip_prob
        )
    else:
        transforms = build_transforms(False, [data_cfg.test_short_size], data_cfg.test_max_size)
    return CocoInstances(json_path, image_dir, transforms=transforms, validate=data_cfg.validate)


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
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=data_cfg.num_workers,
        collate_fn=_collate(data_cfg),
        pin_memory=torch.cuda.is_available(),
    )
