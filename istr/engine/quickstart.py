"""``istr quickstart``: one model, start to end: generated data -> tiny ISTR -> COCO eval -> overlays -> summary.

The main job (``make demo``) is the ablation, ``istr ablate``; this trains a single model.

Re-running it reuses a finished run and resumes an interrupted one (nothing is lost or redone).
"""

from __future__ import annotations

import json
from pathlib import Path

from istr.config import config_hash, load_config
from istr.data.build import split_paths
from istr.engine.predict import load_run, predict_images
from istr.engine.train import train
from istr.io import atomic_write_text
from istr.results import AP_NAMES, CHECKPOINT_FILE, EVAL_FILE


def format_eval_table(metrics: dict) -> str:
    """eval.json -> a Markdown table (rows bbox/segm, columns AP ... APl; '—' where undefined)."""
    lines = ["| | " + " | ".join(AP_NAMES) + " |", "|---" * (len(AP_NAMES) + 1) + "|"]
    for iou_type in ("segm", "bbox"):
        cells = ["—" if metrics[iou_type][n] is None else f"{metrics[iou_type][n]:.1f}" for n in AP_NAMES]
        lines.append(f"| {iou_type} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_quickstart(config: Path, out_dir: Path, overrides: list[str], num_overlays: int = 4) -> Path:
    cfg = load_config(config, overrides)
    run_dir = out_dir / "runs" / f"{config.stem}-{config_hash(cfg)}"
    if not (run_dir / EVAL_FILE).is_file():
        train(cfg, run_dir, resume=(run_dir / CHECKPOINT_FILE).is_file())
    metrics = json.loads((run_dir / EVAL_FILE).read_text())
    run = load_run(run_dir, "auto")
    val_images = sorted(split_paths(cfg.data, "val")[1].iterdir())[:num_overlays]
    # A tiny CPU model scores low (focal-loss sigmoid scores); show what it finds above 0.1.
    overlays = predict_images(run, val_images, out_dir / "predictions", score_threshold=0.1)
    summary = out_dir / "summary.md"
    atomic_write_text(summary, "\n".join([
        f"# Quickstart: `{config}` ({cfg.train.max_steps} steps)", "",
        format_eval_table(metrics), "",
        f"run dir: `{run_dir}`", "",
        *[f"![prediction]({p.relative_to(out_dir)})" for p in overlays], "",
    ]))
    return summary
