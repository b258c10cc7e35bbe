"""Trial records: ``results.csv`` rows (columns in istr/results.py) and ``sweep_status``.

``results.csv`` is rebuilt from the storage + run dirs (never appended), one row per completed
cell, and written atomically, so any number of workers may rewrite it and a reader never sees a
half-written file. Rows are keyed by cell id: a cell completed twice is still one row.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, TrialState

from istr.io import atomic_write_text
from istr.results import COLUMNS, flat_metrics
from istr.sweep.storage import file_lock, open_storage, study_dir

TRIAL_RECORD = "sweep_trial.json"  # written by the harness into a run dir: wall_s, finished_at


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def codec_record(run_dir: Path) -> dict[str, Any]:
    """The run's codec (type, dim from config.yaml) and its reconstruction IoU (codec_stats.json)."""
    try:
        codec = OmegaConf.load(run_dir / "config.yaml").codec
    except (OSError, ValueError, AttributeError):
        return {}
    return {"type": codec.type, "dim": codec.dim, "mask_iou": _read_json(run_dir / "codec_stats.json").get("mask_iou")}


def cell_row(study: str, trial: FrozenTrial) -> dict[str, Any]:
    """One results row from a COMPLETE trial's user attrs and its run dir's files."""
    attrs = trial.user_attrs
    run_dir = Path(attrs["run_dir"])
    stored = attrs.get("record") or {}  # fallback when the run dir lives on another machine
    ev = _read_json(run_dir / "eval.json") or stored.get("eval", {})
    summary = _read_json(run_dir / "train_summary.json") or stored.get("summary", {})
    record = _read_json(run_dir / TRIAL_RECORD) or stored.get("trial", {})
    codec = codec_record(run_dir) or stored.get("codec", {})
    row: dict[str, Any] = {
        "study": study,
        "axis": attrs.get("axis", ""),
        "arm": attrs.get("arm", ""),
        "cell_id": attrs["cell_id"],
        "seed": attrs.get("seed", ""),
        "preset": attrs.get("preset", ""),
        "status": "complete",
        "steps": summary.get("steps"),
        "wall_s": record.get("wall_s"),
        "img_per_s": summary.get("img_per_s"),
        "device": summary.get("device"),
        "run_dir": run_dir.as_posix(),
        "wandb_run_id": summary.get("wandb_run_id"),
        "finished_at": record.get("finished_at")
        or (trial.datetime_complete.isoformat(timespec="seconds") if trial.datetime_complete else ""),
        "reused_from": attrs.get("reused_from", ""),
        "train_s": summary.get("train_seconds"),
        "trial": trial.number,
        "codec_type": codec.get("type"),
        "codec_dim": codec.get("dim"),
        "codec_iou": codec.get("mask_iou"),
        **flat_metrics(ev),
    }
    return row


def completed_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per completed cell (first completion wins), in trial order."""
    rows, seen = [], set()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        cell_id = trial.user_attrs.get("cell_id")
        if not cell_id or cell_id in seen or "run_dir" not in trial.user_attrs:
            continue
        seen.add(cell_id)
        rows.append(cell_row(study.study_name, trial))
    return rows


def write_results(study: optuna.Study, root: Path) -> Path:
    """Rewrite ``<root>/<study>/results.csv`` atomically from the storage + run dirs."""
    out = study_dir(root, study.study_name) / "results.csv"
    with file_lock(out.with_name(".results.lock")):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in completed_rows(study):
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
        atomic_write_text(out, buf.getvalue())
    return out


def status_counts(study: optuna.Study) -> dict[str, Any]:
    """Cells done/running/failed/pending (failed = last attempt failed, not yet re-run)."""
    trials = study.get_trials(deepcopy=False)
    attrs = study.user_attrs
    by_cell: dict[str, set[TrialState]] = {}
    for t in trials:
        cell_id = t.user_attrs.get("cell_id")
        if cell_id:
            by_cell.setdefault(cell_id, set()).add(t.state)
    cells = attrs.get("cell_ids")
    total = len(cells) if cells else int(attrs.get("n_trials", 0))
    keys = cells if cells else list(by_cell)
    done = sum(1 for c in keys if TrialState.COMPLETE in by_cell.get(c, ()))
    running = sum(1 for c in keys if TrialState.COMPLETE not in by_cell.get(c, ())
                  and TrialState.RUNNING in by_cell.get(c, ()))
    failed = sum(1 for c in keys if by_cell.get(c, set()) & {TrialState.FAIL}
                 and not by_cell[c] & {TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING})
    return {
        "study": study.study_name,
        "axis": attrs.get("axis", ""),
        "method": attrs.get("method", ""),
        "total": total,
        "done": done,
        "running": running,
        "failed": failed,
        "remaining": max(total - done, 0),
        "pending": max(total - done - running - failed, 0),
        "trials": len(trials),
    }


def sweep_status(study: str, storage: str | None = None, root: Path = Path("runs/sweeps")) -> dict[str, Any]:
    """Counts of a study's cells: done / running / failed / remaining (= total - done) / pending."""
    root = Path(root)
    if not storage and not (study_dir(root, study) / "journal.log").is_file():
        raise FileNotFoundError(f"no sweep '{study}' under {root} (no {study_dir(root, study) / 'journal.log'})")
    st = optuna.load_study(study_name=study, storage=open_storage(storage, root, study))
    counts = status_counts(st)
    counts["results"] = (study_dir(root, study) / "results.csv").as_posix()
    return counts
