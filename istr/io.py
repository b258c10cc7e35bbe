"""Atomic file writes: a temp file in the same folder, then ``os.replace`` (never a half-written file)."""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


_TEMP_SUFFIX = ".tmp"


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMP_SUFFIX)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda handle: handle.write(text.encode()))


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    _atomic(path, lambda handle: torch.save(obj, handle))


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temp files that killed atomic writes left in ``folder`` (a checkpoint's can be hundreds of MB).

    Only for a folder whose writer is the caller alone: another writer's temp file may be in flight.
    """
    stale = sorted(Path(folder).glob(f".*{_TEMP_SUFFIX}")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``, held for the ``with`` block: one writer at a time across processes
    (the synthetic dataset's generation, results.csv writers, sweep storages off PostgreSQL)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
