"""The codec of a run (docs/architecture.md#data-flow): fitted once on the train masks (or read from the fit cache,
istr/codecs/fit.py) into run_dir/codec.pt, which every rank, a resumed attempt and ``istr eval`` then load."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from istr.codecs import MaskCodec, load_codec
from istr.codecs.fit import fit_or_load_codec
from istr.config import Config
from istr.data.build import split_paths
from istr.data.coco import CocoInstances
from istr.engine import dist as D
from istr.io import atomic_write_json
from istr.results import CODEC_FILE, CODEC_STATS_FILE

log = logging.getLogger(__name__)


def prepare_codec(cfg: Config, run_dir: Path, train_set: CocoInstances, info: D.DistInfo) -> MaskCodec:
    """Rank 0 fits (or loads from the cache) the codec into run_dir/codec.pt; other ranks load it."""
    codec_path = run_dir / CODEC_FILE
    if info.is_main and not codec_path.is_file():
        json_path, _ = split_paths(cfg.data, "train")
        codec, stats, cached = fit_or_load_codec(cfg.codec, json_path, train_set.coco, Path(cfg.cache_dir), cfg.seed)
        codec.save(codec_path)
        atomic_write_json(run_dir / CODEC_STATS_FILE, {**stats, "cache": str(cached)})
        log.info(
            "codec %s-%d: reconstruction mask IoU %.3f on %d train masks",
            cfg.codec.type,
            cfg.codec.dim,
            stats.get("mask_iou", math.nan),
            int(stats.get("n_masks", 0)),
        )
    D.barrier()
    return load_codec(codec_path)
