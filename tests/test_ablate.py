"""``istr ablate``: the seed plan of ``--seeds auto`` (pilot SD -> n, budget cap) and the job end to end."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from analysis.load import COLUMNS, normalize
from analysis.stats import mde_effect_size, needed_n
from istr import ablate
from istr.ablate import AXES, PILOT_SEEDS, axis_defaults, exit_if_any_unfinished, new_cells, pilot_sd, plan_seeds
from istr.cli import build_parser, main
from tests.conftest import REPO


def _in_tmp_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """cwd = tmp_path (its sweeps/ and specs come first); the trials' `python -m istr` still runs this checkout."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.chdir(tmp_path)


def test_plan_needed_n_from_the_pilot_sd() -> None:
    # SD 1 AP of the paired differences, Δ = 1 AP: d = 1 -> 10 pairs (statsmodels TTestPower: 9.94)
    plan = plan_seeds({"loss": 1.0}, {"loss": 3}, delta=1.0, pilot_n=3, cost_per_cell_s=60, remaining_s=1e9, workers=1)
    assert plan.needed == plan.target == {"loss": 10} and not plan.capped
    assert plan.new_cells == 3 * 7 and plan.est_s == 3 * 7 * 60
    plan = plan_seeds({"loss": 0.25}, {"loss": 3}, 1.0, 3, 60, 1e9, 1)  # d = 4: the pilot's 3 pairs suffice
    assert needed_n(1.0, 0.25) <= 3 and plan.target == {"loss": 3} and plan.new_cells == 0


def test_plan_is_capped_by_the_budget() -> None:
    # 600 s left, 100 s a cell, 2 workers: 12 cells = 4 more seeds of 3 arms -> n = 3 + 4
    plan = plan_seeds({"loss": 1.0}, {"loss": 3}, 1.0, 3, cost_per_cell_s=100, remaining_s=600, workers=2)
    assert plan.needed == {"loss": 10} and plan.target == {"loss": 7} and plan.capped
    assert plan.new_cells == 12 and plan.est_s == 600
    spent = plan_seeds({"loss": 1.0}, {"loss": 3}, 1.0, 3, 100, remaining_s=-5, workers=2)
    assert spent.target == {"loss": 3} and spent.new_cells == 0


def test_plan_counts_the_shared_default_cell_once_and_keeps_undefined_sd_at_the_pilot() -> None:
    assert new_cells({"a": 5, "b": 4}, {"a": 3, "b": 2}, have=3) == 2 + 2 * 2 + 1 * 1
    sds = {"a": 1.0, "b": math.nan, "c": 0.0}
    plan = plan_seeds(sds, {"a": 2, "b": 2, "c": 2}, 1.0, PILOT_SEEDS, 10, 1e9, 1)
    assert plan.target == {"a": 10, "b": PILOT_SEEDS, "c": PILOT_SEEDS}


def test_pilot_sd_is_the_largest_sd_of_paired_differences() -> None:
    rows = []
    for arm, values in {"base": [10, 12, 11], "x": [11, 15, 11], "y": [9, 11, 10]}.items():
        rows += [{**dict.fromkeys(COLUMNS), "axis": "loss", "arm": arm, "seed": s, "segm_AP": v, "status": "complete"}
                 for s, v in enumerate(values)]  # fmt: skip
    df = normalize(pd.DataFrame(rows))
    assert pilot_sd(df, "loss", "base") == pytest.approx(pd.Series([1.0, 3.0, 0.0]).std())  # x; y's diffs are equal
    assert math.isnan(pilot_sd(df[df["arm"] != "x"].query("seed == 0"), "loss", "base"))


def test_default_arms_are_the_presets_values_after_the_sets(tmp_path: Path) -> None:
    """The default arm of each axis follows --preset and --set (what the tables mark as "(default)")."""
    assert axis_defaults(list(AXES), REPO / "experiments" / "tiny.yaml", []) == {
        "embedding": "pca", "embedding_dim": "60", "mask_cost": "cosine", "loss": "l2+dice",
        "attention": "self+dynamic"}  # fmt: skip
    preset = tmp_path / "base.yaml"
    preset.write_text("codec:\n  dim: 16\nmodel:\n  attention: self\n")
    assert axis_defaults(["embedding_dim", "attention", "loss"], preset, ["loss.mask=dice"]) == {
        "embedding_dim": "16", "attention": "self", "loss": "dice"}  # fmt: skip


def test_parser_and_seed_options() -> None:
    args = build_parser().parse_args(["ablate", "--preset", "tiny", "--seeds", "auto", "--budget-hours", "0.5"])
    assert args.func is ablate.ablate_command and args.seeds == "auto" and args.delta == 1.0
    assert build_parser().parse_args(["ablate", "--seeds", "2", "--workers", "2"]).seeds == 2
    for bad in ("0", "many"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["ablate", "--seeds", bad])


@pytest.mark.parametrize("argv", [["--seeds", "auto"], ["--seeds", "2", "--budget-hours", "1"],
                                  ["--seeds", "auto", "--budget-hours", "1", "--delta", "0"]])  # fmt: skip
def test_budget_and_auto_go_together(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ablate", *argv, "--out", str(tmp_path / "out"), "--root", str(tmp_path / "runs")]) == 2
    assert "--budget-hours" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written before the options are valid


@pytest.mark.slow
def test_seeds_auto_end_to_end(tmp_path, tiny_cfg_factory, monkeypatch, capsys):
    """Pilot of 3 seeds, a pilot SD that needs 4 pairs, every arm run to 4; the rule file and the footnote."""
    from tests.sweep_helpers import write_setup

    write_setup(tmp_path, tiny_cfg_factory, ["l2+dice", "l2"])  # base.yaml + loss.yaml with two arms
    _in_tmp_cwd(monkeypatch, tmp_path)
    sd4 = 1.0 / mde_effect_size(4) * 0.999  # Δ = 1 AP at this SD takes 4 pairs: the plan must extend the pilot
    assert needed_n(1.0, sd4) == 4
    seen: list[pd.DataFrame] = []
    monkeypatch.setattr(ablate, "pilot_sd", lambda df, axis, base: seen.append(df) or sd4)
    out = tmp_path / "results"
    argv = ["ablate", "--preset", "base.yaml", "--axes", "loss", "--seeds", "auto", "--budget-hours", "1",
            "--delta", "1.0", "--root", str(tmp_path / "runs"), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert sorted(seen[0]["seed"]) == [0, 0, 1, 1, 2, 2]  # the plan saw the pilot only
    rule = json.loads((out / "seed_rule.json").read_text())
    assert rule["mode"] == "auto" and "pilot of 3 seeds" in rule["rule"] and "never added" in rule["rule"]
    assert rule["plan"]["needed"] == {"loss": 4} and rule["plan"]["target"] == {"loss": 4}
    assert rule["n_reached"] == {"loss": 4} and rule["pilot"]["cost_per_cell_s"] > 0
    rows = pd.read_csv(tmp_path / "runs" / "loss-base-n4" / "results.csv")
    assert sorted(zip(rows["arm"], rows["seed"])) == [(a, s) for a in ("l2", "l2+dice") for s in range(4)]
    reused = rows[rows["seed"] < PILOT_SEEDS]["reused_from"]  # the pilot's cells are not trained again
    assert reused.str.startswith(str(out / "cells")).all()
    table = (out / "loss.md").read_text()
    assert "Seeds, rule declared before the run: pilot of 3 seeds" in table and "n reached: 4." in table
    printed = capsys.readouterr().out
    assert printed.index("seed rule (declared before the run") < printed.index("seeds auto: pilot SD")
    assert any(line.startswith("loss: ") and "l2 from l2+dice" in line for line in printed.splitlines())


@pytest.mark.slow
def test_ablate_runs_axes_then_writes_tables_and_figures(tmp_path, tiny_cfg_factory, monkeypatch):
    """End to end: `istr ablate` -> per-axis tables, the codec upper-bound table (with a real codec
    report), learning curves, the codec-dim figure and prediction overlays from the trials' checkpoints."""
    from tests.sweep_helpers import write_setup

    preset, _ = write_setup(tmp_path, tiny_cfg_factory, ["l2"])
    (tmp_path / "sweeps").mkdir()  # the tiny test codec is 16-d: sweep dims 8 and 16 (cwd sweeps/ come first)
    dims = (REPO / "sweeps" / "embedding_dim.yaml").read_text().replace("[40, 60, 80, 100]", "[8, 16]")
    (tmp_path / "sweeps" / "embedding_dim.yaml").write_text(dims)
    _in_tmp_cwd(monkeypatch, tmp_path)
    out = tmp_path / "results"
    argv = ["ablate", "--preset", str(preset), "--axes", "attention,embedding_dim", "--seeds", "1",
            "--root", str(tmp_path / "runs"), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    table = (out / "attention.md").read_text()
    assert all(arm in table for arm in ("self+dynamic (default)", "| self |", "| dynamic |"))
    assert "fixed: seeds 0..0 (--seeds 1) for every arm" in table and "n reached: 1." in table
    report = (out / "codec_report.csv").read_text().splitlines()
    assert len(report) == 3 and report[1].startswith("pca,8,")  # one row per codec trained
    codecs = (out / "codec_upper_bound.md").read_text()
    # the preset's own codec.dim (16) is the default arm, not the smallest dim
    assert "| pca-16 (default) |" in codecs and "| pca-8 |" in codecs and "—†" not in codecs.split("\n\n")[0]
    figures = {p.name for p in (out / "figures").iterdir()}
    for stem in ("attention_mask_ap", "attention_learning_curves", "attention_overlays", "codec_dim",
                 "embedding_dim_overlays"):  # fmt: skip
        assert {f"{stem}.png", f"{stem}.pdf"} <= figures, stem

    # A fresh clone of a committed experiment: the run dirs are gone, only <out> is left. The same command trains
    # nothing (no run dir appears) and writes the same tables and figures, byte for byte.
    written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "overlays" not in p.name}
    shutil.rmtree(tmp_path / "runs")
    assert main(argv) == 0
    assert not list((tmp_path / "runs").glob("*/*/checkpoints"))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "overlays" not in p.name} == written


def _counts(done: int, total: int, running: int = 0, failed: int = 0) -> dict:
    return {"done": done, "total": total, "running": running, "failed": failed, "stale": 0,
            "pending": total - done - running - failed, "running_cells": ["cell x on host y"] * running}


def test_ablate_exits_like_sweep_when_an_axis_is_incomplete(capsys):
    exit_if_any_unfinished({"loss": _counts(6, 6), "attention": _counts(6, 6)})  # complete: returns
    with pytest.raises(SystemExit) as failed:
        exit_if_any_unfinished({"loss": _counts(6, 6), "attention": _counts(4, 6, failed=2)})
    assert failed.value.code == 1
    assert "miss cells of attention" in capsys.readouterr().err
    with pytest.raises(SystemExit) as elsewhere:
        exit_if_any_unfinished({"loss": _counts(5, 6, running=1)})
    assert elsewhere.value.code == 3


def test_n_reached_counts_an_arm_with_no_finished_cell_as_zero() -> None:
    rows = [{"axis": "loss", "arm": arm, "seed": seed, "segm_AP": 20.0, "status": "complete"}
            for arm in ("l2+dice", "l2") for seed in range(3)]  # fmt: skip
    df = normalize(pd.DataFrame(rows))
    assert ablate.n_reached(df, "loss", ["l2+dice", "l2"]) == 3
    assert ablate.n_reached(df, "loss", ["l2+dice", "l2", "dice"]) == 0  # dice has not run yet


def test_training_into_an_archive_of_another_commit_warns(tmp_path, capsys, monkeypatch) -> None:
    record = tmp_path / "cells" / "abc"
    record.mkdir(parents=True)
    (record / "train_summary.json").write_text(json.dumps({"code_version": {"commit": "a" * 40, "dirty": False}}))
    monkeypatch.setattr("istr.provenance.code_version", lambda: {"commit": "b" * 40, "dirty": False})
    ablate.warn_if_code_differs(tmp_path / "cells")
    assert "trained at aaaaaaaaaaaa" in capsys.readouterr().err
    monkeypatch.setattr("istr.provenance.code_version", lambda: {"commit": "a" * 40, "dirty": False})
    ablate.warn_if_code_differs(tmp_path / "cells")
    assert capsys.readouterr().err == ""
