"""Per-image evaluation records: a compact form of COCOeval's per-image matching, and the AP of any weighting of
the val images computed from it (docs/method.md#evaluation-noise).

COCOeval matches each image's detections on its own (``evaluate()``); AP then pools the matches of all images
(``accumulate()``). So the per-image matches of a cell are all that the AP of a resampled val set needs. They
are kept, for area "all" and the last ``maxDets``, as one row per detection in the order ``accumulate()`` ranks
them within its category (by score, ties in image order):

- ``det_image``: the index of the detection's image in ``image_ids``;
- ``det_tp`` / ``det_fp``: one bit per IoU threshold: a true / false positive there (neither: ignored);
- ``category_start``: where each category's rows begin (``len(category_ids) + 1`` offsets);
- ``image_gt``: [image, category] the count of ground truth that is not ignored.

A cell's records are about 6 bytes a detection: 0.2 MB for 500 images at 100 detections each, compressed.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from istr.io import atomic_write_bytes

KEYS = ("image_ids", "category_ids", "iou_thresholds", "det_image", "det_tp", "det_fp", "category_start", "image_gt")
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # COCOeval's recThrs


def compact_records(evaluator: Any) -> dict[str, np.ndarray]:
    """The per-image records of a COCOeval after ``evaluate()`` (area "all", the last maxDets)."""
    p = evaluator.params
    n_img, n_area = len(p.imgIds), len(p.areaRng)
    categories = p.catIds if p.useCats else [-1]
    area, max_det = p.areaRngLbl.index("all"), p.maxDets[-1]
    n_thr = len(p.iouThrs)
    if n_thr > 16:
        raise ValueError(f"per-image records hold at most 16 IoU thresholds, not {n_thr}")
    bits = (1 << np.arange(n_thr, dtype=np.uint16))[:, None]
    det_image, det_tp, det_fp, starts = [], [], [], [0]
    image_gt = np.zeros((n_img, len(categories)), dtype=np.int32)
    for k in range(len(categories)):
        scores, images, tps, fps = [], [], [], []
        for i in range(n_img):
            e = evaluator.evalImgs[(k * n_area + area) * n_img + i]
            if e is None:
                continue
            image_gt[i, k] = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
            matched = np.asarray(e["dtMatches"])[:, :max_det] != 0
            ignored = np.asarray(e["dtIgnore"])[:, :max_det].astype(bool)
            scores.append(np.asarray(e["dtScores"][:max_det], dtype=np.float64))
            images.append(np.full(matched.shape[1], i, dtype=np.int64))
            tps.append(((matched & ~ignored) * bits).sum(0))
            fps.append(((~matched & ~ignored) * bits).sum(0))
        if scores:
            order = np.argsort(-np.concatenate(scores), kind="mergesort")  # as accumulate() ranks them
            det_image.append(np.concatenate(images)[order])
            det_tp.append(np.concatenate(tps)[order])
            det_fp.append(np.concatenate(fps)[order])
        starts.append(starts[-1] + (len(order) if scores else 0))
    empty = np.zeros(0, dtype=np.int64)
    return {
        "image_ids": np.asarray(p.imgIds, dtype=np.int64),
        "category_ids": np.asarray(categories, dtype=np.int64),
        "iou_thresholds": np.asarray(p.iouThrs, dtype=np.float64),
        "det_image": np.concatenate(det_image or [empty]).astype(np.uint16 if n_img < 1 << 16 else np.int64),
        "det_tp": np.concatenate(det_tp or [empty]).astype(np.uint16),
        "det_fp": np.concatenate(det_fp or [empty]).astype(np.uint16),
        "category_start": np.asarray(starts, dtype=np.int64),
        "image_gt": image_gt,
    }


def save_records(path: Path, records: dict[str, np.ndarray]) -> None:
    """Write the records as one compressed ``.npz``, atomically."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{key: records[key] for key in KEYS})
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_records(path: Path) -> dict[str, np.ndarray]:
    """The records of :func:`save_records`; ValueError naming the file when it is not one."""
    try:
        with np.load(Path(path)) as data:
            missing = [key for key in KEYS if key not in data.files]
            if missing:
                raise ValueError(f"{path}: per-image records without {missing}")
            return {key: data[key] for key in KEYS}
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not readable per-image records ({err})") from err


def weighted_ap(records: dict[str, np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Mask (or box) AP in percent, IoU .50:.95, for each row of image weights ``weights`` [draws, images].

    A weight is how many times an image is drawn (a bootstrap resample); all ones is the val set itself,
    and gives COCOeval's own AP. As ``accumulate()``: per category and IoU threshold, precision at the 101
    recall thresholds after making it non-increasing; a category with no ground truth drawn is left out.

    Only the counts at each true positive matter: between two of them recall stays put and precision falls,
    so a run of false positives is one group, and a draw's cumulative counts are one matrix product.
    """
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    n_img, n_thr = records["image_gt"].shape[0], len(records["iou_thresholds"])
    shift = np.arange(n_thr, dtype=np.uint16)
    starts = records["category_start"]
    per_category, counted = [], []
    for k in range(len(records["category_ids"])):
        rows = slice(starts[k], starts[k + 1])
        n_gt = weights @ records["image_gt"][:, k]  # [draws]
        image = records["det_image"][rows].astype(np.int64)
        tp_bits, fp_bits = records["det_tp"][rows], records["det_fp"][rows]
        hit = tp_bits != 0
        opens = hit | np.concatenate([[True], hit[:-1]])  # a true positive, and the detection after one, open a group
        group = np.cumsum(opens) - 1
        n_group = int(group[-1]) + 1 if len(group) else 0
        cumulative = []
        for bits in (tp_bits, fp_bits):
            det, thr = np.nonzero((bits[:, None] >> shift) & 1)
            counts = np.bincount((image[det] * n_thr + thr) * n_group + group[det], minlength=n_img * n_thr * n_group)
            per_draw = weights @ counts.reshape(n_img, n_thr * n_group).astype(np.float64)
            cumulative.append(np.cumsum(per_draw.reshape(-1, n_thr, n_group), axis=2))
        per_category.append(_mean_precision(*cumulative, n_gt))
        counted.append(n_gt > 0)
    if not per_category:
        return np.full(len(weights), np.nan)
    ap, valid = np.stack(per_category, axis=1), np.stack(counted, axis=1)
    with np.errstate(invalid="ignore"):
        return 100 * np.where(valid, ap, 0.0).sum(1) / valid.sum(1)


def _mean_precision(tp: np.ndarray, fp: np.ndarray, n_gt: np.ndarray) -> np.ndarray:
    """[draws] precision averaged over IoU and recall thresholds, from cumulative tp/fp counts [draws, thr, points]."""
    draws, n_thr, n_det = tp.shape
    if n_det == 0:
        return np.zeros(draws)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / n_gt[:, None, None]
    precision = tp / (tp + fp + np.spacing(1))
    precision = np.maximum.accumulate(precision[..., ::-1], axis=2)[..., ::-1]  # the envelope, as accumulate()
    recall, precision = recall.reshape(-1, n_det), precision.reshape(-1, n_det)
    at = np.stack([np.searchsorted(row, RECALL_THRESHOLDS, side="left") for row in recall])
    found = at < n_det
    values = np.take_along_axis(precision, np.minimum(at, n_det - 1), axis=1)
    return np.where(found, values, 0.0).reshape(draws, n_thr, -1).mean(axis=(1, 2))
