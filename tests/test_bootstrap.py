"""Bootstrap SD of COCO segm AP over val images, on a generated dataset with real pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from analysis.bootstrap import bootstrap_ap, evaluated, main, resampled_ap


def _detections(gt_json: Path, shift_every: int = 0) -> list[dict]:
    """Every GT instance as a detection; with `shift_every` = k, every k-th one's mask is moved by 6 px."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_json))
    dets = []
    for i, ann in enumerate(coco.loadAnns(coco.getAnnIds())):
        mask = coco.annToMask(ann)
        if shift_every and i % shift_every == 0:
            mask = np.roll(mask, 6, axis=1)
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode("ascii")
        dets.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "segmentation": rle,
                     "score": 0.9 - 0.01 * (i % 7), "bbox": ann["bbox"]})  # fmt: skip
    return dets


@pytest.fixture
def gt(synth_root: Path) -> Path:
    return synth_root / "annotations" / "instances_val.json"


def _write(tmp_path: Path, dets: list[dict]) -> Path:
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    return path


def test_perfect_detections_have_zero_eval_noise(gt: Path, tmp_path: Path) -> None:
    result = bootstrap_ap(gt, _write(tmp_path, _detections(gt)), iters=30)
    assert result["ap"] == pytest.approx(100.0) and result["sd"] == pytest.approx(0.0, abs=1e-9)
    assert result["iters"] == 30 and result["images"] == len(json.loads(gt.read_text())["images"])


def test_noisy_detections_have_eval_noise(gt: Path, tmp_path: Path) -> None:
    result = bootstrap_ap(gt, _write(tmp_path, _detections(gt, shift_every=2)), iters=50, seed=1)
    assert 0 < result["ap"] < 100 and result["sd"] > 0
    assert result["ci95"][0] < result["ap"] < result["ci95"][1]


def test_paired_difference_uses_the_same_draws_for_both(gt: Path, tmp_path: Path) -> None:
    noisy = _write(tmp_path, _detections(gt, shift_every=2))
    same = bootstrap_ap(gt, noisy, iters=30, dt_b=noisy)  # a model against itself: no difference on any draw
    assert same["diff"] == 0 and same["diff_sd"] == 0 and same["diff_ci95"] == [0, 0]
    perfect = tmp_path / "perfect.json"
    perfect.write_text(json.dumps(_detections(gt)))
    pair = bootstrap_ap(gt, perfect, iters=40, seed=2, dt_b=noisy)
    alone = bootstrap_ap(gt, noisy, iters=40, seed=2)
    assert pair["ap"] == pytest.approx(100.0) and pair["ap_b"] == pytest.approx(alone["ap"])
    assert pair["diff"] == pytest.approx(100.0 - alone["ap"])
    assert pair["diff_sd"] == pytest.approx(alone["sd"])  # perfect is 100 on every draw: only dt-b moves
    assert pair["diff_ci95"][0] <= pair["diff"] <= pair["diff_ci95"][1]


def test_resample_equals_cocoeval_on_the_resampled_dataset(gt: Path, tmp_path: Path) -> None:
    """One draw re-accumulated from the per-image records == a fresh COCOeval of a GT/detections set in which
    each drawn image (repeats included) is its own image."""
    dets = _detections(gt, shift_every=2)
    evaluator = evaluated(gt, _write(tmp_path, dets))
    ids = evaluator.params.imgIds
    draw = np.random.default_rng(4).integers(0, len(ids), len(ids))
    data = json.loads(gt.read_text())
    images = {image["id"]: image for image in data["images"]}
    resampled = {**data, "images": [], "annotations": []}
    new_dets = []
    for new_id, pos in enumerate(draw, start=1):
        old = ids[pos]
        resampled["images"].append({**images[old], "id": new_id})
        for ann in data["annotations"]:
            if ann["image_id"] == old:
                resampled["annotations"].append({**ann, "image_id": new_id, "id": len(resampled["annotations"]) + 1})
        new_dets += [{k: v for k, v in {**d, "image_id": new_id}.items() if k != "bbox"} for d in dets
                     if d["image_id"] == old]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = resampled
        coco.createIndex()
        fresh = COCOeval(coco, coco.loadRes(new_dets), "segm")
        fresh.evaluate()
        fresh.accumulate()
        fresh.summarize()
    assert resampled_ap(evaluator, draw) == pytest.approx(100 * fresh.stats[0])
    assert evaluator.params.imgIds == ids  # the evaluator is left as it was


def test_cli_prints_json_and_names_bad_files(gt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dt = _write(tmp_path, _detections(gt))
    assert main(["--gt", str(gt), "--dt", str(dt), "--iters", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["sd"] == pytest.approx(0.0, abs=1e-9)
    assert main(["--gt", str(gt), "--dt", str(dt), "--dt-b", str(dt), "--iters", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["diff_sd"] == 0
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image_id": 99999, "category_id": 1, "score": 1.0}]')
    assert main(["--gt", str(gt), "--dt", str(bad)]) == 2
    assert "bad.json" in capsys.readouterr().err
    assert main(["--gt", str(tmp_path / "missing.json"), "--dt", str(dt)]) == 2
    assert "missing.json" in capsys.readouterr().err
