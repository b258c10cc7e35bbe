"""Codec reconstruction report: the upper bound each mask-embedding arm can reach (docs/method.md#mask-embedding).

For every (codec type, dim) the codec is fitted on the TRAIN split's box crops (or loaded from the
fingerprinted cache, ``istr.codecs.fit``) and scored on the VAL split's non-crowd GT instances:

* ``mask_iou``: mean IoU of ``decode(encode(m)) > 0`` vs ``m`` on the 28x28 box crops, overall and by
  COCO size (``area`` < 32², < 96², else large; NaN where a size has no instance).
* ``oracle_segm_AP``: COCOeval (segm) of the GT boxes and classes, score 1.0, with the codec-reconstructed
  GT masks pasted back into their GT boxes at image resolution (threshold 0.5) — what a perfect detector
  with a perfect embedding regressor would score with this codec.

A combination that cannot be built or fitted (e.g. a dim above what the codec supports) gets a row with
the error in ``note`` instead of stopping the report.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import itertools
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor

from istr.codecs import CODECS, MASK_SIZE, MaskCodec, mask_iou
from istr.codecs.fit import fit_or_load_codec
from istr.config import Config
from istr.data.build import ensure_dataset, split_paths
from istr.engine.evaluate import coco_evaluate, to_coco_results
from istr.io import atomic_write_text
from istr.model.inference import paste_masks
from istr.targets import crop_masks

log = logging.getLogger(__name__)

# COCO's absolute area thresholds (pycocotools COCOeval.Params.areaRng).
SIZE_RANGES: dict[str, tuple[float, float]] = {
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, math.inf),
}
COLUMNS = [
    "type",
    "dim",
    "mask_iou",
    "mask_iou_small",
    "mask_iou_medium",
    "mask_iou_large",
    "oracle_segm_AP",
    "oracle_segm_AP50",
    "oracle_segm_AP75",
    "n_val_masks",
    "fit_seconds",
    "note",
]
# Markdown decimals per column: IoU in [0, 1] to 3, AP (percent) and seconds to 1.
DECIMALS = {
    **{c: 3 for c in COLUMNS if c.startswith("mask_iou")},
    **{c: 1 for c in COLUMNS if c.startswith("oracle_segm_AP")},
    "fit_seconds": 1,
}
_CODEC_BATCH = 4096


@dataclass
class _ValImage:
    image_id: int
    height: int
    width: int
    boxes: Tensor  # [n,4] x1y1x2y2 GT boxes
    category_ids: list[int]  # COCO category id of each instance
    span: slice  # this image's rows in ValSet.crops


@dataclass
class ValSet:
    """Non-crowd GT instances of the val split, cropped once and shared by every codec."""

    coco: COCO  # GT restricted to the chosen images (crowd annotations kept: COCOeval ignores them)
    images: list[_ValImage]
    crops: Tensor  # [N,S,S] in {0,1}
    areas: Tensor  # [N] annotation ``area``
    iou_valid: Tensor  # [N] bool: box at least 1x1 px, as the fitting crops (fit.box_crops)


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _subset_coco(coco: COCO, image_ids: list[int]) -> COCO:
    keep = set(image_ids)
    sub = COCO()
    sub.dataset = {
        **{k: v for k, v in coco.dataset.items() if k not in ("images", "annotations")},
        "images": [coco.imgs[i] for i in image_ids],
        "annotations": [a for a in coco.dataset["annotations"] if a["image_id"] in keep],
    }
    _quiet(sub.createIndex)
    return sub


def load_val_set(cfg: Config, max_val_images: int = 0) -> ValSet:
    """Crop the val split's non-crowd instance masks to their GT boxes (one decode per image)."""
    json_path, _ = split_paths(cfg.data, "val")
    coco = _quiet(COCO, str(json_path))
    image_ids = sorted(coco.getImgIds())
    if max_val_images > 0 and len(image_ids) > max_val_images:
        image_ids = image_ids[:max_val_images]
        coco = _subset_coco(coco, image_ids)
    size = MASK_SIZE
    images, crops, areas, valid = [], [], [], []
    start = 0
    for image_id in image_ids:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False))
        if not anns:
            continue
        info = coco.imgs[image_id]
        masks = mask_utils.decode([coco.annToRLE(a) for a in anns])  # [H,W,n]
        masks = torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1)))
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        crops.append(crop_masks(masks, boxes, size))
        areas.append(torch.tensor([float(a["area"]) for a in anns]))
        valid.append((xywh[:, 2] >= 1) & (xywh[:, 3] >= 1))
        span = slice(start, start + len(anns))
        start += len(anns)
        images.append(
            _ValImage(image_id, int(info["height"]), int(info["width"]), boxes, [a["category_id"] for a in anns], span)
        )
    empty = torch.zeros((0,))
    return ValSet(
        coco=coco,
        images=images,
        crops=torch.cat(crops) if crops else torch.zeros((0, size, size)),
        areas=torch.cat(areas) if areas else empty,
        iou_valid=torch.cat(valid) if valid else empty.bool(),
    )


@torch.no_grad()
def evaluate_codec(codec: MaskCodec, val: ValSet) -> dict[str, float]:
    """Reconstruction IoU (overall / by size) and oracle segm AP of ``codec`` on ``val``."""
    nan = math.nan
    if val.crops.shape[0] == 0:
        return {}
    logits = torch.cat([codec.decode(codec.encode(chunk)).cpu() for chunk in val.crops.split(_CODEC_BATCH)])
    ious = mask_iou(logits > 0, val.crops > 0.5)
    out: dict[str, float] = {}
    scored = val.iou_valid
    out["mask_iou"] = float(ious[scored].mean()) if bool(scored.any()) else nan
    for name, (low, high) in SIZE_RANGES.items():
        sel = scored & (val.areas >= low) & (val.areas < high)
        out[f"mask_iou_{name}"] = float(ious[sel].mean()) if bool(sel.any()) else nan

    probs = logits.float().sigmoid()
    results: list[dict] = []
    for img in val.images:
        n = img.boxes.shape[0]
        masks = paste_masks(probs[img.span], img.boxes, img.height, img.width) > 0.5
        prediction = {"masks": masks, "boxes": img.boxes, "scores": torch.ones(n), "labels": torch.arange(n)}
        results.extend(to_coco_results(prediction, img.image_id, img.category_ids))
    metrics = coco_evaluate(val.coco, results).metrics
    for stat in ("AP", "AP50", "AP75"):
        value = metrics["segm"][stat]
        out[f"oracle_segm_{stat}"] = nan if value is None else float(value)
    return out


def _params_for(codec_type: str, params: dict[str, Any]) -> dict[str, Any]:
    """``codec.params`` entries that ``codec_type`` takes.

    A key only another codec takes (e.g. ``epochs`` of the AE) is dropped, so one ``codec.params`` can
    serve every arm; a key no codec takes is kept and fails loudly (in the row's ``note``).
    """
    if codec_type not in CODECS:
        return dict(params)

    def names(cls) -> set[str]:
        return set(inspect.signature(cls.__init__).parameters) - {"self", "dim"}

    own = names(CODECS[codec_type])
    others = set().union(*(names(cls) for cls in CODECS.values()))
    return {k: v for k, v in params.items() if k in own or k not in others}


def _fit_or_load(codec_cfg, train_json: Path, train_coco: COCO, cache_dir: Path, seed: int) -> tuple[MaskCodec, float]:
    """``fit_or_load_codec`` plus the fit wall time it records in the cached stats (NaN if unknown)."""
    codec, stats, _ = fit_or_load_codec(codec_cfg, train_json, train_coco, cache_dir, seed)
    return codec, float(stats.get("fit_seconds", math.nan))


def codec_report(
    cfg: Config, types: list[str], dims: list[int], out_dir: Path | None = None, max_val_images: int = 0
) -> pd.DataFrame:
    """One row per (type, dim) of ``types`` x ``dims``; see ``codec_report_pairs``."""
    return codec_report_pairs(cfg, list(itertools.product(types, dims)), out_dir, max_val_images)


def codec_report_pairs(
    cfg: Config, pairs: list[tuple[str, int]], out_dir: Path | None = None, max_val_images: int = 0
) -> pd.DataFrame:
    """One row per (type, dim) pair: reconstruction IoU and oracle segm AP on the val split (docs/method.md#ablations).

    Codecs are fitted on the train split with ``cfg.codec`` (type/dim replaced; ``params`` filtered per
    type) and cached under ``cfg.cache_dir``. ``max_val_images > 0`` scores only the first that many val
    images (by id). With ``out_dir`` the report is also written there (``write_report``).
    """
    ensure_dataset(cfg.data)
    train_json, _ = split_paths(cfg.data, "train")
    train_coco = _quiet(COCO, str(train_json))
    val = load_val_set(cfg, max_val_images)
    n_val = int(val.iou_valid.sum())
    rows = []
    for codec_type, dim in pairs:
        row: dict[str, Any] = {"type": codec_type, "dim": int(dim), "n_val_masks": n_val, "note": ""}
        try:
            codec_cfg = replace(
                cfg.codec, type=codec_type, dim=int(dim), params=_params_for(codec_type, dict(cfg.codec.params))
            )
            codec, row["fit_seconds"] = _fit_or_load(codec_cfg, train_json, train_coco, Path(cfg.cache_dir), cfg.seed)
            row.update(evaluate_codec(codec, val))
        except Exception as err:  # one arm that cannot be built/fitted must not sink the whole report
            log.warning("codec report: %s dim %s failed: %s", codec_type, dim, err)
            row["note"] = f"{type(err).__name__}: {err}"
        log.info("codec report: %s", row)
        rows.append(row)
    df = pd.DataFrame(rows, columns=COLUMNS)
    numeric = [c for c in COLUMNS if c not in ("type", "dim", "n_val_masks", "note")]
    df[numeric] = df[numeric].astype(float)
    if out_dir is not None:
        write_report(df, Path(out_dir))
    return df


def _cell(column: str, value: Any) -> str:
    if value is None or (isinstance(value, float | np.floating) and math.isnan(value)):
        return "n/a"
    if column in DECIMALS:
        return f"{float(value):.{DECIMALS[column]}f}"
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return f"{float(value):g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def format_markdown(df: pd.DataFrame) -> str:
    """GitHub Markdown table of ``df`` (IoU 3 decimals, AP 1 decimal, NaN as ``n/a``); no ``tabulate`` needed."""
    columns = [str(c) for c in df.columns]
    align = ["---:" if pd.api.types.is_numeric_dtype(df[c]) else "---" for c in df.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    for record in df.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(c, v) for c, v in zip(columns, record)) + " |")
    return "\n".join(lines) + "\n"


def write_report(df: pd.DataFrame, out_dir: Path) -> tuple[Path, Path]:
    """Atomically write ``codec_report.csv`` and ``codec_report.md`` under ``out_dir``; return both paths."""
    out_dir = Path(out_dir)
    csv_path, md_path = out_dir / "codec_report.csv", out_dir / "codec_report.md"
    atomic_write_text(csv_path, df.to_csv(index=False))
    atomic_write_text(md_path, format_markdown(df))
    return csv_path, md_path


def codec_upper_bounds(cfg: Config, results: pd.DataFrame, codec_axes: Iterable[str], out: Path) -> Path | None:
    """The codec report of every (type, dim) the ``codec_axes`` rows of ``results`` trained -> ``out/codec_report.csv``

    The reconstruction upper bound of the paper's mask-embedding table (docs/method.md#ablations); None
    when no row holds a codec arm. Codecs come from the fit cache the trials filled, so this only evaluates.
    A report already in ``out`` that holds every pair is kept: an experiment rebuilt from its cell archive
    needs neither the data nor the codecs.
    """
    codecs = results[results["axis"].isin(list(codec_axes))].dropna(subset=["codec_type", "codec_dim"])
    pairs = sorted({(str(t), int(d)) for t, d in zip(codecs["codec_type"], codecs["codec_dim"])})
    if not pairs:
        return None
    path = out / "codec_report.csv"
    if path.is_file():
        kept = pd.read_csv(path)
        if set(pairs) <= {(str(t), int(d)) for t, d in zip(kept["type"], kept["dim"])}:
            return path
    codec_report_pairs(cfg, pairs, out)
    return path
