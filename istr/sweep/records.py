"""Trial records: ``results.csv`` rows (columns in istr/results.py) and ``sweep_status``.

A completed trial carries its row's numbers as flat user attrs (``segm_AP``, ``steps``, ``wall_s``...,
:data:`istr.results.RUN_COLUMNS`), so the storage alone holds every result: ``results.csv`` is rebuilt from it
(never appended) on every machine, one row per completed cell wherever it ran, and written
atomically, so any number of workers may rewrite it and a reader never sees a half-written file.
Rows are keyed by cell id: a cell completed twice is still one row.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from istr.config import load_config
from istr.io import atomic_write_text, file_lock
from istr.results import (
    CODEC_STATS_FILE,
    COLUMNS,
    CONFIG_FILE,
    EVAL_FILE,
    RUN_COLUMNS,
    SUMMARY_FILE,
    TRIAL_RECORD,
    flat_metrics,
)
from istr.sweep.archive import archived
from istr.sweep.storage import open_storage, stale_trials, study_dir, utc_now


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def codec_record(run_dir: Path) -> dict[str, Any]:
    """The run's codec (type, dim from config.yaml, read as ``istr eval`` reads it) and its reconstruction IoU.

    A missing or unreadable config.yaml gives no codec columns rather than failing the results rebuild.
    """
    try:
        codec = load_config(run_dir / CONFIG_FILE).codec
    except (OSError, ValueError):  # ConfigError is a ValueError
        return {}
    return {"type": codec.type, "dim": codec.dim, "mask_iou": _read_json(run_dir / CODEC_STATS_FILE).get("mask_iou")}


def run_columns(run_dir: Path) -> dict[str, Any]:
    """The :data:`RUN_COLUMNS` of a finished run dir (eval.json, train_summary.json, sweep_trial.json, codec)."""
    ev, summary = _read_json(run_dir / EVAL_FILE), _read_json(run_dir / SUMMARY_FILE)
    record, codec = _read_json(run_dir / TRIAL_RECORD), codec_record(run_dir)
    out = flat_metrics(ev)
    out.update(steps=summary.get("steps"), wall_s=record.get("wall_s"), img_per_s=summary.get("img_per_s"),
               device=summary.get("device"), wandb_run_id=summary.get("wandb_run_id"),
               finished_at=record.get("finished_at"), train_s=summary.get("train_seconds"),
               attempts=summary.get("attempts", record.get("attempts")), codec_type=codec.get("type"),
               codec_dim=codec.get("dim"), codec_iou=codec.get("mask_iou"))
    return out


def archive_rows(study: str, axis: str, preset: str, cells: Mapping[str, Any], archive: Path) -> list[dict[str, Any]]:
    """One results row per archived cell of ``cells`` ({cell id: Cell}), in their order; the others have none."""
    rows = []
    for cell_id, cell in cells.items():
        record = archived(archive, cell_id)
        if record is not None:
            rows.append({"study": study, "axis": axis, "arm": cell.arm, "cell_id": cell_id, "seed": cell.seed,
                         "preset": preset, "status": "complete", "run_dir": record.as_posix(),
                         **run_columns(record)})  # fmt: skip
    return rows


def cell_row(study: str, trial: FrozenTrial) -> dict[str, Any]:
    """One results row from a COMPLETE trial's user attrs (the run dir for trials stored before them)."""
    attrs = trial.user_attrs
    stored = {k: attrs[k] for k in RUN_COLUMNS if k in attrs}
    row: dict[str, Any] = {
        "study": study,
        "axis": attrs.get("axis", ""),
        "arm": attrs.get("arm", ""),
        "cell_id": attrs["cell_id"],
        "seed": attrs.get("seed", ""),
        "preset": attrs.get("preset", ""),
        "status": "complete",
        "run_dir": attrs["run_dir"],
        "reused_from": attrs.get("reused_from", ""),
        "trial": trial.number,
        **(stored or run_columns(Path(attrs["run_dir"]))),
    }
    if not row.get("finished_at") and trial.datetime_complete:
        row["finished_at"] = trial.datetime_complete.isoformat(timespec="seconds")
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


def _describe(trial: FrozenTrial) -> str:
    """Trial, cell, arm, seed and where its worker runs: host, pid and, under SLURM, ``slurm job JOBID_TASK``."""
    a = trial.user_attrs
    slurm = f" slurm job {a['slurm_job_id']}_{a.get('slurm_array_task_id', '?')}" if a.get("slurm_job_id") else ""
    return (f"trial {trial.number} cell {a.get('cell_id', '?')} ({a.get('arm', '?')}, s{a.get('seed', '?')}) "
            f"on {a.get('host', '?')} pid {a.get('pid', '?')}{slurm}")


def status_counts(study: optuna.Study, root: Path | None = None) -> dict[str, Any]:
    """Cells done/running/stale/failed/pending (failed = last attempt failed, not yet re-run).

    With ``root``, a RUNNING trial whose worker is dead (lease expired, pid gone, heartbeat lost) counts
    as stale, not running; the next ``istr sweep`` of the study re-queues its cell. A study submitted with
    ``--launcher slurm`` also lists its SLURM job ids (``slurm_jobs``).
    """
    trials = study.get_trials(deepcopy=False)
    stale = stale_trials(study, root) if root is not None else {}
    attrs = study.user_attrs
    by_cell: dict[str, set[str]] = {}
    live: list[FrozenTrial] = []
    for t in trials:
        cell_id = t.user_attrs.get("cell_id")
        state = "STALE" if t.number in stale else t.state.name
        if state == "RUNNING":
            live.append(t)
        if cell_id:
            by_cell.setdefault(cell_id, set()).add(state)
    cells = attrs.get("cell_ids")
    total = len(cells) if cells else int(attrs.get("n_trials", 0))
    keys = cells if cells else list(by_cell)

    def count(*states: str, without: tuple[str, ...] = ()) -> int:
        return sum(1 for c in keys if by_cell.get(c, set()) & set(states) and not by_cell[c] & set(without))

    done, running, stale_n = count("COMPLETE"), count("RUNNING", without=("COMPLETE",)), count(
        "STALE", without=("COMPLETE", "RUNNING"))
    failed = count("FAIL", without=("COMPLETE", "RUNNING", "WAITING", "STALE"))
    slurm = {"slurm_jobs": attrs["slurm_jobs"]} if attrs.get("slurm_jobs") else {}
    return {
        "study": study.study_name,
        "axis": attrs.get("axis", ""),
        "method": attrs.get("method", ""),
        "total": total,
        "done": done,
        "running": running,
        "stale": stale_n,
        "failed": failed,
        "remaining": max(total - done, 0),
        "pending": max(total - done - running - stale_n - failed, 0),
        "trials": len(trials),
        "running_cells": [_describe(t) for t in live],
        "stale_cells": [f"{_describe(t)}: {stale[t.number]}" for t in trials if t.number in stale],
        **slurm,
    }


def progress_line(study: optuna.Study, event: str, trial_id: int) -> str:
    """One log line per cell start/end (for logs off a terminal): counts and an ETA.

    ETA = the cells not done x the mean wall time of this study's completed cells / the cells running now.
    """
    counts = status_counts(study)
    walls = [t.user_attrs["wall_s"] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
             if isinstance(t.user_attrs.get("wall_s"), (int, float))]
    eta = "?"
    if walls:
        seconds = statistics.mean(walls) * counts["remaining"] / max(counts["running"], 1)
        eta = str(timedelta(seconds=round(seconds)))
    trial = study._storage.get_trial(trial_id)
    what = f"{event} {_describe(trial)}"
    if event == "end":
        what += f": {trial.state.name.lower()}" + (f" {trial.values[0]:.4g}" if trial.values else "")
        if trial.user_attrs.get("fail_reason") == "preempted":
            what += " (preempted: queued again, resumes from its checkpoint)"
    return (f"{utc_now()} sweep {study.study_name}: {what} | {counts['done']}/{counts['total']} done, "
            f"{counts['running']} running, ETA {eta}")


def load_existing(study: str, storage: str | None, root: Path) -> optuna.Study:
    """An existing study (never creates one): FileNotFoundError naming the storage when absent."""
    if not storage and not (study_dir(root, study) / "journal.log").is_file():
        raise FileNotFoundError(f"no sweep '{study}' under {root} (no {study_dir(root, study) / 'journal.log'})")
    opened = open_storage(storage, root, study)
    if study not in {s.study_name for s in opened.get_all_studies()}:
        raise FileNotFoundError(f"no study '{study}' in {storage or study_dir(root, study) / 'journal.log'}")
    return optuna.load_study(study_name=study, storage=opened)


def sweep_status(study: str, storage: str | None = None, root: Path = Path("runs/sweeps")) -> dict[str, Any]:
    """Counts of a study's cells: done / running / stale / failed / remaining (= total - done) / pending."""
    root = Path(root)
    counts = status_counts(load_existing(study, storage, root), root)
    counts["results"] = (study_dir(root, study) / "results.csv").as_posix()
    return counts


def sweep_results(study: str, storage: str | None = None, root: Path = Path("runs/sweeps")) -> Path:
    """``<root>/<study>/results.csv`` rebuilt from the storage: every completed cell, wherever it ran."""
    return write_results(load_existing(study, storage, Path(root)), Path(root))
