"""`istr bench` runs end to end on CPU and writes valid JSON (not timed)."""

from __future__ import annotations

import json
import math

import pytest

from istr.bench.phases import phase_summary
from istr.cli import main


def _check(result: dict) -> None:
    for name in ("istr", "maskrcnn"):
        for key in ("inference_img_per_s", "train_steps_per_s"):
            stats = result[name][key]
            assert 0 < stats["min"] <= stats["median"] <= stats["max"] < math.inf
    assert result["ratio"]["inference"] > 0 and result["ratio"]["train"] > 0
    for kind in ("train", "inference"):
        phases = result["phases"][kind]
        assert all(v["ms"] >= 0 for v in phases["phases"].values())
        assert phases["sum_ms"] == pytest.approx(sum(v["ms"] for v in phases["phases"].values()))
    assert set(result["phases"]["train"]["phases"]) >= {
        "backbone+fpn",
        "roi_pooling",
        "stages",
        "matcher",
        "criterion (incl. decode)",
        "backward",
        "optimizer",
    }
    assert set(result["phases"]["inference"]["phases"]) >= {"model", "decode", "rle_encode"}
    assert 0 <= result["phases"]["train"]["matcher+criterion_pct"] <= 100


@pytest.mark.slow
def test_istr_bench_writes_valid_json(tmp_path, capsys):
    path = tmp_path / "out" / "bench.json"
    argv = "bench --iters 2 --warmup 0 --size 128 --backbone r18 --batch 1 --num-queries 16 --phase-iters 1"
    assert main([*argv.split(), "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    _check(result)
    assert result["config"]["backbone"] == "resnet18"
    out = capsys.readouterr().out
    assert "ISTR/MRCNN" in out and "matcher+criterion" in out


@pytest.mark.slow
def test_istr_bench_non_square_records_both_sides(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = (
        "bench --height 96 --width 140 --iters 1 --warmup 0 --backbone r18 --batch 1 --num-queries 16 --phase-iters 1"
    )
    assert main([*argv.split(), "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    _check(result)
    assert (result["config"]["height"], result["config"]["width"]) == (96, 140)  # 140: padded to 160
    assert "96x140 (HxW)" in capsys.readouterr().out


@pytest.mark.slow
def test_non_square_inputs_are_not_resized():
    import torch

    from istr.bench.inputs import synthetic_batch
    from istr.bench.models import build_maskrcnn

    images, targets = synthetic_batch(2, 50, 70, num_classes=3)
    assert images.shape == (2, 3, 50, 70)
    for t in targets:
        assert t["masks"].shape[1:] == (50, 70)
        assert (t["boxes"][:, 0::2] <= 70).all() and (t["boxes"][:, 1::2] <= 50).all()
        assert (t["boxes"][:, 2:] > t["boxes"][:, :2]).all()
    # The paper's test size: Mask R-CNN's transform keeps 800x1333 (pads to 800x1344, as ISTR's collate).
    model = build_maskrcnn("resnet18", 3, 800, 1333, torch.device("cpu"), 0).eval()
    batch, _ = model.transform([torch.rand(3, 800, 1333)])
    assert batch.image_sizes == [(800, 1333)] and tuple(batch.tensors.shape[-2:]) == (800, 1344)


@pytest.mark.parametrize("order", [0, 1], ids=["as-given", "reversed"])
def test_phase_summary_means_each_phase_and_its_share(order):
    runs = [({"a": 10.0, "b": 30.0}, 50.0), ({"a": 20.0, "b": 10.0}, 30.0)]
    summary = phase_summary(runs if order == 0 else runs[::-1])
    assert summary["n"] == 2 and summary["total_ms"] == 40.0 and summary["sum_ms"] == 35.0
    assert summary["phases"]["a"] == {"ms": 15.0, "pct": 37.5}
    assert summary["phases"]["b"] == {"ms": 20.0, "pct": 50.0}


@pytest.mark.slow
def test_istr_bench_preset_writes_plain_fast_flops_and_peak(tmp_path, tiny_cfg, capsys):
    from istr.config import to_yaml

    preset = tmp_path / "tiny_test.yaml"
    preset.write_text(to_yaml(tiny_cfg))
    path = tmp_path / "cell.json"
    argv = ["bench", "--preset", str(preset), "--set", "model.pretrained=auto", "--iters", "1", "--warmup", "0"]
    assert main([*argv, "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["plain_img_per_s"] > 0 and result["fast_img_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["fast_img_per_s"] / result["plain_img_per_s"])
    assert result["flops_per_step"] > 1e6 and result["threads"] == 1
    assert set(result["peak_flops"]) == {"fp32", "bf16"} and all(v > 0 for v in result["peak_flops"].values())
    assert set(result["efficiency"]) == {"plain", "fast"} and all(0 < v < 10 for v in result["efficiency"].values())
    assert "fast / plain" in capsys.readouterr().out
