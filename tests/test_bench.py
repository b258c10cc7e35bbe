"""`istr bench` runs end to end on CPU and writes valid JSON (not timed; issue 7)."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from istr.bench import add_parsers, run_bench

pytestmark = pytest.mark.slow

# Fewer ISTR queries than the paper's 300 only to keep the test fast on a 2-core CPU.
FAST = {"num_queries": 16, "phase_iters": 1}


def _check(result: dict) -> None:
    for name in ("istr", "maskrcnn"):
        for key in ("inference_img_per_s", "train_steps_per_s"):
            stats = result[name][key]
            assert 0 < stats["min"] <= stats["median"] <= stats["max"] < math.inf
    assert result["ratio"]["inference"] > 0 and result["ratio"]["train"] > 0
    for kind in ("train", "inference"):
        phases = result["phases"][kind]
        assert all(v["ms"] >= 0 for v in phases["phases"].values())
        # The phases partition the instrumented step (up to timer overhead).
        assert abs(phases["sum_ms"] - phases["total_ms"]) <= 0.1 * phases["total_ms"] + 5
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


def test_run_bench_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    result = run_bench(iters=2, warmup=1, size=128, backbone="resnet18", batch=1, json_path=path, **FAST)
    on_disk = json.loads(path.read_text())
    assert on_disk["config"]["backbone"] == "resnet18" and on_disk["config"]["size"] == 128
    assert on_disk["istr"]["inference_img_per_s"]["n"] == 2
    _check(on_disk)
    assert on_disk["ratio"] == result["ratio"]


def test_bench_cli_handler(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="istr")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    path = tmp_path / "out" / "bench.json"
    argv = "bench --iters 2 --warmup 0 --size 128 --backbone r18 --batch 1 --num-queries 16 --phase-iters 1"
    args = parser.parse_args([*argv.split(), "--json", str(path)])
    args.func(args)
    result = json.loads(path.read_text())
    _check(result)
    assert result["config"]["backbone"] == "resnet18"
    out = capsys.readouterr().out
    assert "ISTR/MRCNN" in out and "matcher+criterion" in out
