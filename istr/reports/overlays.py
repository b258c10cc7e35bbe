"""Prediction overlays of two arms on the same val images: the default arm vs the best other arm (by mean mask AP).

Models are rebuilt from the trials' run dirs (`istr.engine.predict.load_run`: config.yaml, codec.pt,
checkpoints/last.pt), so this needs the run dirs on this machine; rows without one are skipped. It runs
models, so it lives with the commands, not in `analysis` (which only reads result files).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from analysis.plots import save_figure
from analysis.stats import default_arm
from istr.config import load_config
from istr.data.build import split_paths
from istr.engine.predict import load_run, overlay_images
from istr.results import CHECKPOINT_FILE, CONFIG_FILE

log = logging.getLogger(__name__)
SCORE_THRESHOLD, MIN_SHOWN = 0.3, 3  # detections drawn: score >= 0.3, else an image's best 3


def _run_dir(df: pd.DataFrame, axis: str, arm: str) -> Path | None:
    """The arm's lowest-seed trial whose run dir has a final checkpoint."""
    for row in df[(df["axis"] == axis) & (df["arm"] == arm)].sort_values("seed").itertuples():
        path = Path(str(row.run_dir))
        if (path / CHECKPOINT_FILE).is_file():
            return path
    return None


def pick_arms(df: pd.DataFrame, axis: str, defaults: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """(default arm, the other arm with the highest mean mask AP); None when the axis has one arm."""
    base, _ = default_arm(df, axis, defaults)
    others = df[(df["axis"] == axis) & (df["arm"] != base)]
    if others.empty:
        return None
    means = others.groupby("arm")["segm_AP"].mean().fillna(-1.0)
    return base, str(means.sort_values(ascending=False, kind="stable").index[0])


def val_images(run_dir: Path, count: int) -> list[Path]:
    """The first `count` val images (by image id) of the run's dataset."""
    json_path, image_dir = split_paths(load_config(run_dir / CONFIG_FILE).data, "val")
    images = sorted(json.loads(json_path.read_text())["images"], key=lambda image: image["id"])
    return [image_dir / image["file_name"] for image in images[:count]]


def overlay_grid(
    df: pd.DataFrame, axis: str, count: int = 3, defaults: Mapping[str, str] | None = None
) -> plt.Figure | None:
    """A 2 x `count` grid: row 1 the default arm's predictions, row 2 the other arm's, same val images."""
    arms = pick_arms(df, axis, defaults)
    if arms is None:
        return None
    run_dirs = [_run_dir(df, axis, arm) for arm in arms]
    if any(d is None for d in run_dirs):
        log.warning("overlays of %s skipped: no run dir with checkpoints/last.pt for %s", axis, arms)
        return None
    paths = val_images(run_dirs[0], count)
    fig, axes = plt.subplots(2, len(paths), figsize=(2.6 * len(paths), 5.6), squeeze=False)
    for r, (arm, run_dir) in enumerate(zip(arms, run_dirs)):
        for c, image in enumerate(overlay_images(load_run(run_dir, device="cpu"), paths, SCORE_THRESHOLD, MIN_SHOWN)):
            axes[r, c].imshow(image)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(arm + (" (default)" if r == 0 else ""))
    for c, path in enumerate(paths):
        axes[0, c].set_title(path.name, fontsize=8)
    fig.suptitle(f"{axis}: predictions (score ≥ {SCORE_THRESHOLD:g}, else the best {MIN_SHOWN}) on the same val images")
    fig.tight_layout()
    return fig


def write_overlays(
    df: pd.DataFrame, out: Path, count: int = 3, defaults: Mapping[str, str] | None = None
) -> list[Path]:
    """``<axis>_overlays.png|pdf`` under ``out`` for every axis of ``df`` whose two arms have run dirs here."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for axis in sorted(df["axis"].dropna().unique()):
        grid = overlay_grid(df, axis, count, defaults)
        if grid is not None:
            written += save_figure(grid, out, f"{axis}_overlays")
    return written
