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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda handle: handle.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    import torch  # here, so that the analysis and the CLI's start import this module without torch

    _atomic(path, lambda handle: torch.save(obj, handle))


OUTPUT_MARKER = ".istr-output"  # in an --out folder a command made: it may write there again


class ForeignFolderError(ValueError):
    """An output folder that holds files this project did not write; nothing was written into it."""


def claim_output_folder(folder: Path, option: str = "--out", marker: str = OUTPUT_MARKER, contents: str = "") -> Path:
    """Make ``folder`` an output folder of istr's, or refuse it untouched (README, "Output files").

    A missing or empty folder is made and marked: ``marker`` is written with ``contents``. A folder
    holding ``marker`` is reused (its marker rewritten). Anything else is a user's folder:
    :class:`ForeignFolderError` names ``option`` and the folder, and nothing is written.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ForeignFolderError(f"{option} {folder} is a file, not a folder")
    if folder.is_dir() and not (folder / marker).is_file() and any(folder.iterdir()):
        raise ForeignFolderError(f"{option} {folder} is not empty and was not made by istr (it holds no "
                                 f"{marker}); istr writes only into a missing or empty folder, or one it "
                                 "made. Nothing was changed: pick another folder")
    try:
        atomic_write_text(folder / marker, contents)
    except OSError as err:
        raise ForeignFolderError(f"{option} {folder}: cannot write there ({err.strerror})") from None
    return folder


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
