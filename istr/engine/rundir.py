"""The run dir: the one folder a training writes, and the rule that keeps a user's files safe from it.

The project writes only into a folder it made (docs/architecture.md#results): one that was missing or
empty, or one that holds its marker, ``run.json`` with ``"made_by": "istr"``. Anything else is refused,
naming the folder, before any data work and before any write. A start that fails before its first
training step leaves the folder as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from istr.io import atomic_write_json, atomic_write_text, remove_stale_temps
from istr.results import CHECKPOINT_FILE, RUN_MARKER_FILE

MADE_BY = "istr"


class RunDirError(ValueError):
    """``--out`` names a folder this project may not write into, or a run dir it cannot continue."""


def marker(path: Path) -> dict[str, Any] | None:
    """The run marker's contents, or None where ``path`` holds no marker of this project."""
    try:
        payload = json.loads((Path(path) / RUN_MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) and payload.get("made_by") == MADE_BY else None


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse, before anything is read or written, a ``run_dir`` that a fresh start (or ``resume``) may not use.

    Fresh: a missing folder under a writable one, an empty writable folder, or a run dir of this project
    that holds no checkpoint. Resume: a run dir of this project with a checkpoint (read by the caller).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir} is a file, not a folder")
    if resume:
        if marker(run_dir) is None:
            raise RunDirError(f"--resume: {run_dir} is not a run dir of this project (it holds no {RUN_MARKER_FILE} "
                              "written by istr); nothing was changed")
        if not (run_dir / CHECKPOINT_FILE).is_file():
            raise RunDirError(f"--resume: {run_dir / CHECKPOINT_FILE} does not exist; drop --resume to start afresh")
        return
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if marker(run_dir) is None:
            raise RunDirError(f"--out {run_dir} is not empty and is not a run dir of this project (no "
                              f"{RUN_MARKER_FILE} written by istr); istr writes only into a missing or empty folder, "
                              "or one it made. Nothing was changed: pick another --out")
        if (run_dir / CHECKPOINT_FILE).is_file():
            raise RunDirError(f"{run_dir} already holds a run; pass --resume to continue it or pick another --out")
    base = _first_existing(run_dir)
    if not base.is_dir():
        raise RunDirError(f"--out {run_dir}: {base} is a file, so the folder cannot be made")
    if not os.access(base, os.W_OK | os.X_OK):
        raise RunDirError(f"--out {run_dir}: {base} is not writable")


@contextlib.contextmanager
def claimed(run_dir: Path, marker_fields: dict[str, Any]) -> Iterator[None]:
    """Make ``run_dir``, mark it, and undo both if the ``with`` block fails.

    On failure, only what the block added goes: the folders it made, and the entries that were not there
    before; the marker gets its old contents back. A killed checkpoint write's stale temp file (istr/io.py)
    is removed first.
    """
    run_dir = Path(run_dir)
    created = _first_existing(run_dir) != run_dir
    top_created = run_dir
    while created and not top_created.parent.exists():
        top_created = top_created.parent
    before = set(run_dir.iterdir()) if run_dir.is_dir() else set()
    old_marker = (run_dir / RUN_MARKER_FILE).read_text() if (run_dir / RUN_MARKER_FILE) in before else None
    try:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirError(f"--out {run_dir}: cannot make the folder ({err.strerror})") from None
        remove_stale_temps((run_dir / CHECKPOINT_FILE).parent)  # only this training writes there
        atomic_write_json(run_dir / RUN_MARKER_FILE, {**(marker(run_dir) or {}), **marker_fields, "made_by": MADE_BY})
        yield
    except BaseException:
        if created:
            shutil.rmtree(top_created, ignore_errors=True)
        else:
            for entry in set(run_dir.iterdir()) - before:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink(missing_ok=True)
            if old_marker is not None:
                atomic_write_text(run_dir / RUN_MARKER_FILE, old_marker)
        raise


def claim_run_dir(run_dir: Path) -> None:
    """Mark a folder the caller has just made (a sweep cell's) as a run dir, so ``istr train --out`` may use it."""
    check_run_dir(run_dir, resume=False)
    with claimed(run_dir, {}):
        pass
