"""COCO evaluation (bbox + segm) with pycocotools' COCOeval -> eval.json in percent (docs/method.md#evaluation).

:func:`evaluate_run` is the one evaluation of a run: the end of ``istr train``, its ``train.eval_every`` evaluations
and ``istr eval`` all write the same files the same way.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader
from tqdm import tqdm

from istr.codecs import MaskCodec
from istr.config import Config
from istr.data.build import build_dataset, build_eval_loader
from istr.engine.precision import autocast, use_amp
from istr.engine.rle import encode_masks
from istr.eval_images import compact_records, save_records
from istr.io import atomic_write_json, atomic_write_text
from istr.model.inference import postprocess
from istr.results import AP_NAMES, EVAL_FILE, EVAL_IMAGES_FILE, EVAL_TEXT_FILE, IOU_TYPES


def to_coco_results(prediction: dict, image_id: int, category_ids: list[int]) -> list[dict]:
    """One image's predictions -> COCO result records (xywh boxes, compressed RLE masks)."""
    if prediction["scores"].numel() == 0:
        return []
    rles = encode_masks(prediction["masks"])
    boxes = prediction["boxes"].cpu().clone()
    boxes[:, 2:] -= boxes[:, :2]
    records = []
    for rle, box, score, label in zip(
        rles, boxes.tolist(), prediction["scores"].tolist(), prediction["labels"].tolist()
    ):
        rle["counts"] = rle["counts"].decode("ascii")
        records.append(
            {"image_id": image_id, "category_id": category_ids[label], "bbox": box, "score": score, "segmentation": rle}
        )
    return records


@torch.no_grad()
def predict_batch(
    model: torch.nn.Module,
    codec: torch.nn.Module,
    batch: dict,
    device: torch.device,
    max_detections: int = 100,
    mask_threshold: float = 0.5,
    amp: bool = False,
) -> list[dict]:
    """One collated batch -> per image {scores, labels, boxes, masks} in original image coordinates.

    The one inference path of ``istr eval`` and ``istr predict``, so their detections are the same: eval
    batches hold images of one padded shape (``ShapeGroupedBatchSampler``) and predict collates one image
    with the same ``collate_batch``, so each image is the same padded tensor (docs/method.md#evaluation).
    """
    images = batch["images"].to(device, non_blocking=True)
    image_sizes = batch["image_sizes"].to(device)
    with autocast(device, amp):  # ``amp``: what use_amp(device, train.amp) says, as in training
        outputs = model(images, image_sizes)
    orig_sizes = torch.tensor([t["orig_size"] for t in batch["targets"]])
    return postprocess(outputs, codec, image_sizes, orig_sizes, max_detections, mask_threshold)


@torch.no_grad()
def predict_dataset(
    model: torch.nn.Module,
    codec: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    category_ids: list[int],
    max_detections: int = 100,
    mask_threshold: float = 0.5,
    progress: bool = True,
    amp: bool = False,
) -> list[dict]:
    """COCO result records of every image ``loader`` yields, in its batch order (COCOeval keys them by image_id)."""
    model.eval()
    results: list[dict] = []
    for batch in tqdm(loader, desc="eval", disable=not progress, dynamic_ncols=True, mininterval=2.0):
        predictions = predict_batch(model, codec, batch, device, max_detections, mask_threshold, amp)
        for prediction, target in zip(predictions, batch["targets"]):
            results.extend(to_coco_results(prediction, int(target["image_id"]), category_ids))
    return results


class CocoEvaluation(NamedTuple):
    """COCOeval's numbers in percent ({"bbox": {...}, "segm": {...}}), its printed summary, and the segm per-image
    records (:mod:`istr.eval_images`; None without detections)."""

    metrics: dict[str, dict[str, float | None]]
    summary: str
    segm_records: dict[str, np.ndarray] | None


def coco_evaluate(coco_gt: COCO, results: list[dict]) -> CocoEvaluation:
    """COCOeval on both IoU types. A metric COCOeval cannot compute (no GT in that size range) is None, never 0."""
    metrics: dict[str, dict[str, float | None]] = {}
    text = io.StringIO()
    records = None
    for iou_type in IOU_TYPES:
        if not results:
            metrics[iou_type] = {name: 0.0 for name in AP_NAMES}
            continue
        detections = copy.deepcopy(results)  # loadRes mutates its input
        if iou_type == "segm":
            # As detectron2: without a bbox, COCOeval sizes detections by mask area, not box area.
            for detection in detections:
                detection.pop("bbox", None)
        with contextlib.redirect_stdout(text):
            coco_dt = coco_gt.loadRes(detections)
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.evaluate()
            if iou_type == "segm":
                records = compact_records(evaluator)
            evaluator.accumulate()
            print(f"== {iou_type} ==")
            evaluator.summarize()
        metrics[iou_type] = {
            name: (None if value < 0 or math.isnan(value) else round(100 * float(value), 3))
            for name, value in zip(AP_NAMES, evaluator.stats[:6])
        }
    return CocoEvaluation(metrics, text.getvalue(), records)


def evaluate_run(
    cfg: Config,
    model: torch.nn.Module,
    codec: MaskCodec,
    device: torch.device,
    run_dir: Path,
    detections_path: Path | None = None,
) -> dict:
    """COCOeval on the val split -> run_dir/eval.json (percent) and the per-image records (eval_images.npz); the
    detections too, to ``detections_path``."""
    val_set = build_dataset(cfg.data, "val", train=False)
    loader = build_eval_loader(val_set, cfg.data, cfg.eval.batch_size)
    results = predict_dataset(
        model,
        codec,
        loader,
        device,
        val_set.category_ids,
        cfg.eval.max_detections,
        cfg.eval.mask_threshold,
        cfg.logging.progress,
        use_amp(device, cfg.train.amp),
    )
    if detections_path is not None:
        atomic_write_json(detections_path, results)
    evaluation = coco_evaluate(val_set.coco, results)
    atomic_write_json(run_dir / EVAL_FILE, evaluation.metrics)
    atomic_write_text(run_dir / EVAL_TEXT_FILE, evaluation.summary)
    if evaluation.segm_records is not None:
        save_records(run_dir / EVAL_IMAGES_FILE, evaluation.segm_records)
    return evaluation.metrics
