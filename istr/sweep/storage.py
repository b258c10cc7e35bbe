"""Optuna storage for a study, plus the trial leases that detect dead workers.

- default: an Optuna **journal file** ``<root>/<study>/journal.log`` (``optuna-dashboard
  runs/sweeps/<study>/journal.log`` opens it). A journal has no heartbeat, so each running trial
  holds a **lease file** ``<root>/<study>/leases/trial-<n>.json`` (host, pid, expiry) that its
  worker renews while the training subprocess runs; :func:`reap_stale_trials` fails a RUNNING
  trial whose lease expired or whose worker pid is gone on this host, and the runner re-queues
  its cell.
- ``postgresql://...`` (any SQLAlchemy URL): Optuna ``RDBStorage`` with heartbeats; the worker
  records a heartbeat with every lease renewal and a trial whose heartbeat stopped is stale
  (this works across machines; lease files are local only).

:func:`storage_lock` serialises the read-modify-write steps (schema and study creation, reaping,
enqueueing the grid) of every process sharing a storage: a PostgreSQL advisory lock, held by the
database, so machines that share nothing but the URL agree; a ``flock`` beside a journal file.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import warnings
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from istr.io import file_lock

LEASE_TTL_S = 60.0
HEARTBEAT_INTERVAL_S = 10
HEARTBEAT_GRACE_S = 60
HOST = socket.gethostname()


def study_dir(root: Path, study: str) -> Path:
    return Path(root) / study


def is_rdb(url: str | None) -> bool:
    return bool(url) and "://" in str(url)


def journal_path(url: str | None, root: Path, study: str) -> Path:
    return Path(url) if url else study_dir(root, study) / "journal.log"


def open_storage(url: str | None, root: Path, study: str) -> BaseStorage:
    """``None`` -> journal file under the study dir; a file path -> that journal; a URL -> RDB."""
    if is_rdb(url):
        with storage_lock(url, root, study, "schema"), warnings.catch_warnings():
            # heartbeat_interval is "experimental" since Optuna 2.9; the lock: the first RDBStorage
            # creates Optuna's tables, and two machines doing it at once collide on CREATE TYPE
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                str(url),
                heartbeat_interval=HEARTBEAT_INTERVAL_S,
                grace_period=HEARTBEAT_GRACE_S,
                engine_kwargs={"pool_pre_ping": True},
            )
    path = journal_path(url, root, study)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


def _lock_key(name: str) -> int:
    """A signed 64-bit advisory-lock key for ``name`` (the same on every machine)."""
    return int.from_bytes(hashlib.sha256(f"istr-sweep:{name}".encode()).digest()[:8], "big", signed=True)


@contextmanager
def storage_lock(url: str | None, root: Path, study: str, name: str = "queue"):
    """An exclusive lock that every process sharing the storage ``url`` agrees on.

    ``name="schema"`` is one lock per database (creating Optuna's tables), any other name is per study.
    PostgreSQL: a session advisory lock, released by the server if its holder dies. A journal or an
    SQLite file: a ``flock`` beside it. Other SQLAlchemy URLs: a ``flock`` in the study dir (one machine).
    """
    if is_rdb(url) and str(url).startswith("postgresql"):
        key = _lock_key(name if name == "schema" else f"{study}:{name}")
        engine = create_engine(str(url), poolclass=NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        finally:
            engine.dispose()
        return
    if not is_rdb(url):
        path = journal_path(url, root, study)
    elif str(url).startswith("sqlite:///"):
        path = Path(str(url)[len("sqlite:///"):])
    else:
        path = study_dir(root, study) / "storage"
    with file_lock(path.with_name(f".{path.name}.{name}.lock")):
        yield


def lease_path(root: Path, study: str, trial_number: int) -> Path:
    return study_dir(root, study) / "leases" / f"trial-{trial_number}.json"


def write_lease(path: Path, trial_number: int, cell_id: str, ttl: float = LEASE_TTL_S) -> None:
    from istr.io import atomic_write_json

    atomic_write_json(path, {"host": HOST, "pid": os.getpid(), "trial": trial_number, "cell_id": cell_id,
                             "expires": time.time() + ttl})


def read_lease(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is dead too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _stale_reason(trial: FrozenTrial, root: Path, study: str, ttl: float, now: float) -> str | None:
    host, pid = trial.user_attrs.get("host"), trial.user_attrs.get("pid")
    if host == HOST and pid is not None and not pid_alive(int(pid)):
        return f"worker pid {pid} on {host} is gone"
    lease = read_lease(lease_path(root, study, trial.number))
    if lease is not None:
        if lease.get("host") == HOST and not pid_alive(int(lease["pid"])):
            return f"worker pid {lease['pid']} on {HOST} is gone"
        if lease["expires"] < now:
            return f"lease expired {now - lease['expires']:.0f}s ago"
        return None
    started = trial.datetime_start
    if started is not None:
        age = now - started.timestamp()  # Optuna stores naive local times
        if age > ttl and host is None:
            return f"no lease and no worker recorded after {age:.0f}s"
    return None


def stale_trials(study: optuna.Study, root: Path, ttl: float = LEASE_TTL_S) -> dict[int, str]:
    """RUNNING trials whose worker is dead -> why (lease expired, pid gone, heartbeat lost); reads only."""
    storage = study._storage
    lost = set(storage._get_stale_trial_ids(study._study_id)) if is_heartbeat_enabled(storage) else set()
    now, stale = time.time(), {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial._trial_id in lost:
            stale[trial.number] = f"no heartbeat for over {HEARTBEAT_GRACE_S}s"
        elif (reason := _stale_reason(trial, root, study.study_name, ttl, now)) is not None:
            stale[trial.number] = reason
    return stale


def reap_stale_trials(study: optuna.Study, root: Path, ttl: float = LEASE_TTL_S) -> list[FrozenTrial]:
    """Fail the :func:`stale_trials` (each gets a ``fail_reason``); the trials failed here."""
    stale = stale_trials(study, root, ttl)
    failed: list[FrozenTrial] = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.number not in stale:
            continue
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", f"stale: {stale[trial.number]}")
            if not study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                continue
        except (RuntimeError, ValueError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # finished meanwhile
        lease_path(root, study.study_name, trial.number).unlink(missing_ok=True)
        failed.append(trial)
    return failed


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
