"""The results schema: one list of metric columns, eval.json flattened onto it, arm names."""

from __future__ import annotations

from istr.results import COLUMNS, METRICS, NUMERIC, arm_name, flat_metrics


def test_metrics_are_the_six_coco_numbers_per_iou_type_and_in_the_columns():
    assert len(METRICS) == 12 and METRICS[:2] == ["segm_AP", "segm_AP50"] and "bbox_APl" in METRICS
    assert [c for c in COLUMNS if c in METRICS] == METRICS and set(NUMERIC) <= set(COLUMNS)
    assert len(set(COLUMNS)) == len(COLUMNS)


def test_flat_metrics_names_every_metric_and_keeps_undefined_as_none():
    flat = flat_metrics({"segm": {"AP": 10.5, "APl": None}, "bbox": {"AP": 20.0}, "extra": 3})
    assert list(flat) == METRICS
    assert flat["segm_AP"] == 10.5 and flat["bbox_AP"] == 20.0
    assert flat["segm_APl"] is None and flat["bbox_AP50"] is None  # undefined or missing: never 0
    assert all(v is None for v in flat_metrics({}).values())


def test_arm_name_of_one_and_several_axis_keys():
    assert arm_name({"codec.type": "dct", "seed": 1}) == "dct"
    assert arm_name({"codec.type": "pca", "codec.dim": 40, "seed": 0}) == "codec.type=pca,codec.dim=40"
