"""analysis.plots: learning curves from the trials' metrics.jsonl, codec-dim figure, files written."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from analysis.load import COLUMNS, normalize
from analysis.plots import codec_dim_figure, learning_curves, read_curves, write_figures


def _trial(tmp_path: Path, axis: str, arm: str, seed: int, losses: list[float], **extra) -> dict:
    run_dir = tmp_path / f"{axis}-{arm}-{seed}"
    run_dir.mkdir()
    lines = [{"step": i + 1, "loss": loss} for i, loss in enumerate(losses)]
    lines.append({"step": len(losses), "eval/segm_AP": 5.0 + seed})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    row = {c: None for c in COLUMNS}
    row.update(study="s", axis=axis, arm=arm, seed=seed, status="complete", cell_id=f"{axis}{arm}{seed}",
               run_dir=str(run_dir), segm_AP=3.0 + seed, **extra)  # fmt: skip
    return row


def test_learning_curves_read_every_trial(tmp_path: Path) -> None:
    rows = [_trial(tmp_path, "loss", arm, seed, [4.0, 3.0, 2.0]) for arm in ("l2+dice", "l2") for seed in (0, 1)]
    rows.append({**rows[0], "run_dir": str(tmp_path / "gone"), "seed": 2})  # a run dir on another machine
    df = normalize(pd.DataFrame(rows))
    curves = read_curves(df, "loss")
    assert len(curves.dropna(subset=["loss"])) == 12 and set(curves["arm"]) == {"l2+dice", "l2"}
    fig = learning_curves(df, "loss")
    assert len(fig.axes) == 2  # loss + the logged eval mask AP
    assert learning_curves(df, "attention") is None


def test_codec_dim_figure_and_write_figures(tmp_path: Path) -> None:
    rows = [
        _trial(tmp_path, "embedding_dim", str(dim), seed, [2.0, 1.0], codec_type="pca", codec_dim=dim,
               codec_iou=0.9 + dim / 1000)  # fmt: skip
        for dim in (40, 60)
        for seed in (0, 1)
    ]
    df = normalize(pd.DataFrame(rows))
    report = pd.DataFrame({"type": ["pca", "pca", "dct", "dct"], "dim": [40, 60, 40, 60], "mask_iou": [0.9] * 4})
    fig = codec_dim_figure(df, report)
    assert "codec-report" in fig.axes[1].get_title()
    assert "trial codec fit" in codec_dim_figure(df, None).axes[1].get_title()
    names = {p.name for p in write_figures(df, tmp_path / "figures", report)}
    expected = {"embedding_dim_mask_ap", "embedding_dim_learning_curves", "codec_dim"}
    assert {f"{stem}.{ext}" for stem in expected for ext in ("png", "pdf")} == names
