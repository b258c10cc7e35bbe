"""The results schema: one list of metric columns, eval.json flattened onto it, arm names."""

from __future__ import annotations

import numpy as np

from istr.results import CELL_COLUMNS, COLUMNS, METRICS, RUN_COLUMNS, arm_name, flat_metrics
from istr.sweep.records import run_columns


def test_metric_names_line_up_with_cocoevals_stats():
    """One large square and a perfect detection of it: AP = AP50 = APl = 100, small and medium undefined. A
    metric named after the wrong COCOeval stat would read another number."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    from istr.engine.evaluate import coco_evaluate

    square = np.zeros((128, 128), dtype=np.uint8, order="F")
    square[10:110, 10:110] = 1
    rle = mask_utils.encode(square)
    rle["counts"] = rle["counts"].decode("ascii")
    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "width": 128, "height": 128}], "categories": [{"id": 1, "name": "s"}],
                  "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": rle,
                                   "area": 10000.0, "bbox": [10, 10, 100, 100], "iscrowd": 0}]}  # fmt: skip
    gt.createIndex()
    detection = {"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [10, 10, 100, 100], "segmentation": rle}
    flat = flat_metrics(coco_evaluate(gt, [detection]).metrics)
    assert list(flat) == METRICS
    for kind in ("segm", "bbox"):
        assert flat[f"{kind}_AP"] == flat[f"{kind}_AP50"] == flat[f"{kind}_AP75"] == flat[f"{kind}_APl"] == 100
        assert flat[f"{kind}_APs"] is None and flat[f"{kind}_APm"] is None
    assert [c for c in COLUMNS if c in METRICS] == METRICS and len(set(COLUMNS)) == len(COLUMNS)


def test_flat_metrics_names_every_metric_and_keeps_undefined_as_none():
    flat = flat_metrics({"segm": {"AP": 10.5, "APl": None}, "bbox": {"AP": 20.0}, "extra": 3})
    assert list(flat) == METRICS
    assert flat["segm_AP"] == 10.5 and flat["bbox_AP"] == 20.0
    assert flat["segm_APl"] is None and flat["bbox_AP50"] is None  # undefined or missing: never 0
    assert all(v is None for v in flat_metrics({}).values())


def test_arm_name_of_one_and_several_axis_keys():
    assert arm_name({"codec.type": "dct", "seed": 1}) == "dct"
    assert arm_name({"codec.type": "pca", "codec.dim": 40, "seed": 0}) == "codec.type=pca,codec.dim=40"


def test_every_column_comes_from_the_cell_or_from_the_run_dir(tmp_path):
    assert sorted([*CELL_COLUMNS, *RUN_COLUMNS]) == sorted(COLUMNS) and not set(CELL_COLUMNS) & set(RUN_COLUMNS)
    assert list(run_columns(tmp_path)) == RUN_COLUMNS  # an empty run dir still gives every run-dir column
    assert all(v is None for v in run_columns(tmp_path).values())
