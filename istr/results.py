"""The results schema: what a trained cell reports and the columns of a study's ``results.csv``.

Written by the engine (eval.json), the sweep harness (results.csv) and W&B, read by ``analysis``;
this module is their one definition (docs/architecture.md#results).
"""

from __future__ import annotations

from typing import Any

# The files of a run dir (docs/architecture.md#results), named here once for the engine that writes them and
# the sweep, the reports and the analysis that read them.
RUN_MARKER_FILE = "run.json"  # istr's marker (docs/architecture.md#results), with the config hash
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
COST_FILE = "cost.json"
EVAL_FILE = "eval.json"
EVAL_TEXT_FILE = "eval.txt"
EVAL_IMAGES_FILE = "eval_images.npz"  # segm per-image records (istr/eval_images.py): what the val bootstrap needs
SUMMARY_FILE = "train_summary.json"
CODEC_FILE = "codec.pt"
CODEC_STATS_FILE = "codec_stats.json"
CHECKPOINT_FILE = "checkpoints/last.pt"
TRIAL_RECORD = "sweep_trial.json"  # written by the sweep harness: wall_s, attempts, finished_at
TRAIN_LOG = "train.log"  # the sweep's child `istr train` output
# What a cell archive keeps of a finished run dir (istr/sweep/archive.py): everything but the weights.
ARCHIVED_FILES = (CONFIG_FILE, EVAL_FILE, EVAL_TEXT_FILE, EVAL_IMAGES_FILE, SUMMARY_FILE, METRICS_FILE, COST_FILE,
                  CODEC_STATS_FILE, TRIAL_RECORD)  # fmt: skip

AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval's first six stats, in its order
IOU_TYPES = ("bbox", "segm")
METRICS = [f"{kind}_{name}" for kind in ("segm", "bbox") for name in AP_NAMES]  # results.csv metric columns
COLUMNS = [
    "study", "axis", "arm", "cell_id", "seed", "preset", "status", *METRICS,
    "steps", "wall_s", "img_per_s", "device", "run_dir", "wandb_run_id", "finished_at",
    "reused_from", "train_s", "trial", "attempts",
    "codec_type", "codec_dim", "codec_iou",  # the cell's mask codec and its train reconstruction IoU
]  # fmt: skip
# The columns the sweep's storage gives a row (the cell, its trial, where it ran); every other column comes from
# the run dir (:data:`RUN_COLUMNS`).
CELL_COLUMNS = ("study", "axis", "arm", "cell_id", "seed", "preset", "status", "run_dir", "reused_from", "trial")
# The run-dir columns, in COLUMNS order: a completed trial stores them as flat user attrs (istr/sweep/records.py).
RUN_COLUMNS = [c for c in COLUMNS if c not in CELL_COLUMNS]
NUMERIC = [*METRICS, "steps", "wall_s", "img_per_s", "train_s", "trial", "attempts", "codec_dim", "codec_iou"]


def flat_metrics(eval_json: dict[str, Any]) -> dict[str, float | None]:
    """``eval.json`` (``{"segm": {"AP": ...}, "bbox": {...}}``) -> ``{"segm_AP": ..., ...}``, every METRICS name.

    A metric the file lacks is None (undefined), never 0.
    """
    sections = {kind: eval_json.get(kind) if isinstance(eval_json.get(kind), dict) else {} for kind in IOU_TYPES}
    return {f"{kind}_{name}": sections[kind].get(name) for kind in ("segm", "bbox") for name in AP_NAMES}


def arm_name(params: dict[str, Any]) -> str:
    """A cell's arm from its swept parameters: ``codec.type=dct`` -> ``dct``; several keys -> ``k=v,k=v``."""
    axis = {k: v for k, v in params.items() if k != "seed"}
    if len(axis) == 1:
        return str(next(iter(axis.values())))
    return ",".join(f"{k}={v}" for k, v in axis.items())
