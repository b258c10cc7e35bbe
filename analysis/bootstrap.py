"""Evaluation noise: the bootstrap SD of COCO AP over the val images (how much the AP of one fixed set of detections
moves when the val set is redrawn), to compare with the seed SD of the ablation tables.

Each resample draws the val image ids with replacement. COCOeval's per-image matching (`evaluate()`) does not
depend on the other images, so it runs once; each resample only re-accumulates the drawn images' records.

An ablation compares two models on the same val images, so what its verdict depends on is the noise of their
*difference*: with `--dt-b` (a second model's detections), every resample draws the images once for both and the
result adds the paired difference AP(dt) - AP(dt-b), its SD and 95% interval.

CLI: `python -m analysis.bootstrap --gt instances_val.json --dt detections.json [--dt-b other.json] [--iters 200]
[--iou-type segm]` prints a JSON object (ap, sd, ci95, iters, images; with --dt-b also ap_b, diff, diff_sd, diff_ci95).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable {what} JSON file ({err})") from err


def evaluated(gt: Path, dt: Path, iou_type: str = "segm") -> COCOeval:
    """COCOeval of the detections file `dt` against the ground truth `gt`, after `evaluate()` (per-image matching).

    As the project's evaluator does for segm, detections are sized by mask area (their `bbox` is dropped).
    """
    data = _read_json(gt, "COCO ground-truth")
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise ValueError(f"{gt}: a COCO ground truth needs images, annotations and categories")
    dets = _read_json(dt, "COCO results")
    if not isinstance(dets, list) or not dets:
        raise ValueError(f"{dt}: a COCO results file is a non-empty list of detections")
    known = {image["id"] for image in data["images"]}
    unknown = sorted({d.get("image_id") for d in dets} - known, key=str)
    if unknown:
        raise ValueError(f"{dt}: detections for image ids not in {gt}: {unknown[:5]}")
    if iou_type == "segm":
        dets = [{k: v for k, v in d.items() if k != "bbox"} for d in dets]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = data
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(dets), iou_type)
        evaluator.evaluate()
    return evaluator


def resampled_ap(evaluator: COCOeval, draw: np.ndarray) -> float:
    """AP (percent, IoU .50:.95, area all, the last maxDets) over the images at positions `draw` of
    `evaluator.params.imgIds` (repeats allowed), from the per-image records of `evaluated`.

    The drawn records are laid out as COCOeval's own (category, area range, image) order under placeholder image
    ids 0..len(draw)-1, so `accumulate()` treats each draw as a distinct image.
    """
    p = evaluator.params
    n_img, n_area = len(p.imgIds), len(p.areaRng)
    n_cat = len(p.catIds) if p.useCats else 1
    records = evaluator.evalImgs
    saved = (records, p.imgIds, evaluator._paramsEval.imgIds)
    evaluator.evalImgs = [records[(k * n_area + a) * n_img + i] for k in range(n_cat) for a in range(n_area)
                          for i in draw]  # fmt: skip
    p.imgIds = evaluator._paramsEval.imgIds = list(range(len(draw)))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.accumulate()
    finally:
        evaluator.evalImgs, p.imgIds, evaluator._paramsEval.imgIds = saved
    area = p.areaRngLbl.index("all")
    precision = evaluator.eval["precision"][:, :, :, area, len(p.maxDets) - 1]
    valid = precision[precision > -1]
    return 100 * float(valid.mean()) if valid.size else math.nan


def _spread(samples: np.ndarray) -> tuple[float, list[float]]:
    """Bootstrap SD and 95% percentile interval of the non-NaN samples."""
    samples = samples[~np.isnan(samples)]
    sd = float(samples.std(ddof=1)) if len(samples) > 1 else math.nan
    return sd, [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))] if len(samples) else []


def bootstrap_ap(
    gt: Path, dt: Path, iters: int = 200, seed: int = 0, iou_type: str = "segm", dt_b: Path | None = None
) -> dict[str, Any]:
    """The AP of `dt` on all val images of `gt`, and its bootstrap SD and 95% percentile interval over `iters`
    resamples of the val images (with replacement, `seed` for the draws). With `dt_b`, the same draws also give
    the paired difference AP(dt) - AP(dt_b) and its spread."""
    if iters < 2:
        raise ValueError(f"bootstrap needs at least 2 resamples (got iters={iters})")
    evaluators = [evaluated(gt, path, iou_type) for path in ([dt] if dt_b is None else [dt, dt_b])]
    n_img = len(evaluators[0].params.imgIds)
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, n_img, n_img) for _ in range(iters)]
    samples = np.array([[resampled_ap(e, draw) for e in evaluators] for draw in draws])
    full = [resampled_ap(e, np.arange(n_img)) for e in evaluators]
    sd, ci95 = _spread(samples[:, 0])
    result = {"iou_type": iou_type, "ap": full[0], "sd": sd, "ci95": ci95,
              "iters": int((~np.isnan(samples[:, 0])).sum()), "images": n_img, "seed": seed}  # fmt: skip
    if dt_b is not None:
        diff_sd, diff_ci95 = _spread(samples[:, 0] - samples[:, 1])
        result.update(ap_b=full[1], diff=full[0] - full[1], diff_sd=diff_sd, diff_ci95=diff_ci95)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.bootstrap", description=__doc__.splitlines()[0])
    ap.add_argument("--gt", type=Path, required=True, help="COCO ground-truth JSON (e.g. instances_val.json)")
    ap.add_argument("--dt", type=Path, required=True, help="COCO results JSON (a list of detections)")
    ap.add_argument("--dt-b", type=Path, default=None,
                    help="a second model's results JSON: adds the paired difference AP(dt) - AP(dt-b)")
    ap.add_argument("--iters", type=int, default=200, help="bootstrap resamples (default 200)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    ap.add_argument("--iou-type", choices=("segm", "bbox"), default="segm")
    args = ap.parse_args(argv)
    try:
        result = bootstrap_ap(args.gt, args.dt, args.iters, args.seed, args.iou_type, args.dt_b)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
