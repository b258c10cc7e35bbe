"""``istr predict``: detection counts, overlays scaled to the image, a COCO results json that plain
pycocotools scores exactly as ``istr eval`` does; ``istr eval --save-detections``."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from istr.cli import main
from istr.config import load_config
from istr.engine.predict import detection_summary, draw_overlay
from istr.engine.train import train
from istr.results import AP_NAMES, IOU_TYPES

from .conftest import tiny_overrides


def _prediction(boxes: list[list[float]], scores: list[float], size: tuple[int, int]) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores),
        "labels": torch.zeros(len(scores), dtype=torch.int64),
        "masks": torch.zeros((len(scores), *size), dtype=torch.uint8),
    }


def test_summary_counts_detections_above_threshold_and_names_the_best_score():
    prediction = _prediction([[0, 0, 1, 1]] * 3, [0.245, 0.1, 0.05], (4, 4))
    assert detection_summary(prediction, 0.3) == "0 detections above 0.3 (max score 0.245)"
    assert detection_summary(prediction, 0.1) == "2 detections above 0.1 (max score 0.245)"
    assert detection_summary(_prediction([], [], (4, 4)), 0.3) == "0 detections above 0.3 (max score none)"


def test_overlay_shows_the_best_detections_when_none_passes_the_threshold():
    image = Image.new("RGB", (64, 64))
    prediction = _prediction([[8, 8, 30, 30], [34, 34, 60, 60]], [0.05, 0.2], (64, 64))
    blank = np.asarray(draw_overlay(image, prediction, ["thing"], 0.3))
    best = np.asarray(draw_overlay(image, prediction, ["thing"], 0.3, min_shown=1))
    assert not blank.any()
    zoom = best.shape[0] // 64
    assert best[40 * zoom : 60 * zoom, 34 * zoom : 60 * zoom].any()  # the 0.2 box is drawn
    assert not best[12 * zoom : 30 * zoom, 12 * zoom : 30 * zoom].any()  # the 0.05 one is not


@pytest.mark.parametrize(("side", "min_width"), [(200, 1), (2000, 5)])
def test_box_lines_grow_with_the_image(side, min_width):
    image = Image.new("RGB", (side, side))
    box = [side * 0.25, side * 0.25, side * 0.75, side * 0.75]
    overlay = np.asarray(draw_overlay(image, _prediction([box], [0.9], (side, side)), ["thing"], 0.3))
    zoom = overlay.shape[0] // side
    row = overlay[int(side * 0.5 * zoom)]  # a row through the box's middle: only its two edges are drawn
    left_edge = np.flatnonzero(row.any(axis=1))
    left_edge = left_edge[left_edge < overlay.shape[1] // 2]
    assert len(left_edge) >= min_width
    assert len(left_edge) <= max(2 * min_width, 2)


@pytest.fixture(scope="module")
def trained_run(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("predict")
    # batch 1: eval then runs the very batches predict runs, so the detections are the same bits
    cfg = load_config(None, [*tiny_overrides(synth_root, tmp / "cache"), "train.max_steps=2", "eval.batch_size=1"])
    train(cfg, tmp / "run")
    return tmp / "run"


@pytest.mark.slow
def test_predict_with_zero_detections_says_so_and_draws_nothing(trained_run, synth_root, tmp_path, capsys):
    image = sorted((synth_root / "images" / "val").glob("*.png"))[0]
    args = ["predict", "--run", str(trained_run), str(image), "--out", str(tmp_path), "--score-threshold", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"0 detections above 1 \(max score 0\.\d{3}\)", out), out
    original = Image.open(image).convert("RGB")
    overlay = Image.open(tmp_path / f"{image.stem}_pred.png")
    assert overlay.tobytes() == original.resize(overlay.size, Image.NEAREST).tobytes()


def _plain_cocoeval(gt_json: Path, detections: list[dict]) -> dict[str, dict[str, float | None]]:
    """Score with nothing but pycocotools (segm without boxes, so areas are mask areas, as istr eval)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        scores = {}
        for iou_type in IOU_TYPES:
            dets = [{k: v for k, v in d.items() if not (iou_type == "segm" and k == "bbox")} for d in detections]
            evaluator = COCOeval(gt, gt.loadRes(dets), iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            scores[iou_type] = {n: None if v < 0 else round(100 * float(v), 3)
                                for n, v in zip(AP_NAMES, evaluator.stats[:6])}
    return scores


@pytest.mark.slow
def test_predict_json_scored_by_pycocotools_equals_istr_eval(trained_run, synth_root, tmp_path, capsys):
    saved = tmp_path / "eval_detections.json"
    assert main(["eval", "--run", str(trained_run), "--save-detections", str(saved)]) == 0
    eval_metrics = json.loads((trained_run / "eval.json").read_text())
    val_json = synth_root / "annotations" / "instances_val.json"
    records = sorted(json.loads(val_json.read_text())["images"], key=lambda r: r["id"])
    images = [str(synth_root / "images" / "val" / r["file_name"]) for r in records]
    predicted = tmp_path / "predict.json"
    assert main(["predict", "--run", str(trained_run), *images, "--out", str(tmp_path / "pred"),
                 "--json", str(predicted)]) == 0
    assert "image_id = the val json's image ids" in capsys.readouterr().out
    detections = json.loads(predicted.read_text())
    assert detections and {d["image_id"] for d in detections} <= {r["id"] for r in records}
    assert detections == json.loads(saved.read_text())  # the same records, not only the same scores
    assert _plain_cocoeval(val_json, detections) == eval_metrics
