"""``istr ablate``: the axis sweeps, then tables, figures, the codec upper bound and prediction overlays."""

from __future__ import annotations

import argparse

import pytest

from istr.ablate import add_parser

from .conftest import REPO
from .test_sweep import write_setup


def test_parser_shares_the_sweep_options():
    parser = argparse.ArgumentParser(prog="istr")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["ablate", "--preset", "tiny", "--seeds", "2", "--workers", "2", "--axes", "loss"])
    assert (args.preset, args.seeds, args.workers, args.axes) == ("tiny", 2, 2, "loss")
    assert args.func.__name__ == "ablate_command"


@pytest.mark.slow
def test_ablate_runs_axes_then_writes_tables_and_figures(tmp_path, tiny_cfg_factory, monkeypatch):
    """End to end: `istr ablate` -> per-axis tables, the codec upper-bound table (with a real codec
    report), learning curves, the codec-dim figure and prediction overlays from the trials' checkpoints."""
    from istr.cli import main

    monkeypatch.setenv("WANDB_MODE", "disabled")
    preset, _ = write_setup(tmp_path, tiny_cfg_factory, ["l2"])
    (tmp_path / "sweeps").mkdir()  # the tiny test codec is 16-d: sweep dims 8 and 16 (cwd sweeps/ come first)
    dims = (REPO / "sweeps" / "embedding_dim.yaml").read_text().replace("[40, 60, 80, 100]", "[8, 16]")
    (tmp_path / "sweeps" / "embedding_dim.yaml").write_text(dims)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results"
    argv = ["ablate", "--preset", str(preset), "--axes", "attention,embedding_dim", "--seeds", "1",
            "--root", str(tmp_path / "runs"), "--out", str(out)]
    assert main(argv) == 0
    table = (out / "attention.md").read_text()
    assert all(arm in table for arm in ("self+dynamic (default)", "| self |", "| dynamic |"))
    report = (out / "codec_report.csv").read_text().splitlines()
    assert len(report) == 3 and report[1].startswith("pca,8,")  # one row per codec trained
    codecs = (out / "codec_upper_bound.md").read_text()
    # DEFAULT_ARMS' "60" is absent here, so the smallest dim is the default arm
    assert "| pca-8 (default) |" in codecs and "| pca-16 |" in codecs and "—†" not in codecs.split("\n\n")[0]
    figures = {p.name for p in (out / "figures").iterdir()}
    for stem in ("attention_mask_ap", "attention_learning_curves", "attention_overlays", "codec_dim",
                 "embedding_dim_overlays"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= figures, stem
