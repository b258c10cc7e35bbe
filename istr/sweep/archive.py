"""The cell archive: what a finished cell's run dir holds except its weights, kept under ``<archive>/<cell id>/``,
so that an experiment can live in git and be resumed from it (docs/sweeps.md#the-cell-archive).

A sweep given an archive copies each cell there once it has finished, and counts an archived cell as done:
a later run of the same command, on any machine or a fresh clone, never trains it again. The files kept are
:data:`istr.results.ARCHIVED_FILES`: the resolved config, eval.json and the per-image records, the train
summary (with the code version), the learning curve, the cost and the harness's trial record.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from istr.results import ARCHIVED_FILES, EVAL_FILE


def archived(archive: Path | None, cell_id: str) -> Path | None:
    """The cell's archived record, or None (no archive, or the cell is not in it)."""
    if archive is None:
        return None
    record = Path(archive) / cell_id
    return record if (record / EVAL_FILE).is_file() else None


def archive_cell(run_dir: Path, archive: Path, cell_id: str) -> Path:
    """Copy a finished run dir's :data:`ARCHIVED_FILES` to ``<archive>/<cell id>/`` (whole, or not at all);
    a cell already archived is left as it is."""
    record = Path(archive) / cell_id
    if archived(archive, cell_id):
        return record
    staging = Path(archive) / f".{cell_id}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ARCHIVED_FILES:
        if (Path(run_dir) / name).is_file():
            shutil.copy2(Path(run_dir) / name, staging / name)
    shutil.rmtree(record, ignore_errors=True)  # an incomplete copy (no eval.json) left by a killed run
    staging.rename(record)
    return record
