"""``istr sweep SPEC --launcher slurm``: a sweep's workers as ONE SLURM job array on a shared storage.

Each array task is an ordinary sweep worker, ``python -m istr sweep SPEC --workers 1 --no-wait --name
STUDY --storage URL --root ROOT ...``: it takes queued cells from the shared study until none is left,
exactly as another machine would (docs/sweeps.md#slurm). The submitting command first checks the spec,
creates the study and queues its cells, and makes the generated data and the ``auto`` backbone once
(workers starting together on several nodes would each make them), then writes the batch script under
``ROOT/STUDY/slurm/`` and submits it. Only the CLI imports this module: SLURM stays at the edge.

Why a batch script of our own (``sbatch``/``squeue``/``scancel`` through subprocess) and not submitit:
submitit is well kept, but it runs a pickled Python callable under its own bootstrap (a CLI only as a
subprocess of one, ``helpers.CommandFunction``), so SLURM's signals reach submitit's process, not our
worker; and its preemption model is checkpoint-then-requeue of the same job (``scontrol requeue``),
which keeps an interrupted cell waiting for that one task to be scheduled again, whereas a cell here
must go back to the shared queue at once for any running worker to resume. With a plain script the
batch shell execs the worker, so ``--signal=B:USR1@90`` (the time limit's warning) and scancel's
SIGTERM reach the worker itself (istr/sweep/trial.py hands the cell back), nothing is pickled, no
dependency is added, and the script can be read and re-submitted by hand.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from istr.config import ConfigError
from istr.sweep.records import load_existing, status_counts, write_results
from istr.sweep.runner import build_plan, has_work, needs_training, plan_cells, prepare_shared, prepare_study
from istr.sweep.spec import resolve_spec_path
from istr.sweep.storage import LEASE_TTL_S, is_rdb, storage_lock, study_dir, utc_now
from istr.sweep.trial import SweepPlan

# B: the batch shell, i.e. the worker it exec'd (not its training child, which the worker tells itself); 90 s
# before the time limit: time to finish a step and write a checkpoint
SIGNAL = "B:USR1@90"
LOCAL_HOSTS = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
POLL_S = 10.0


class SlurmError(ConfigError):
    """A SLURM submission that cannot work as asked (a ConfigError: ``istr`` prints it without a traceback)."""


@dataclass
class SlurmOptions:
    """What a cluster asks of each array task (one worker): ``#SBATCH`` options, then extra lines verbatim."""

    partition: str | None = None
    account: str | None = None
    time: str | None = None  # sbatch --time: minutes, or [D-]HH:MM:SS
    gpus_per_worker: int = 0
    cpus_per_worker: int | None = None
    sbatch_lines: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The ``#SBATCH`` lines of these options; a bad extra line is a SlurmError naming ``--sbatch-line``."""
        gres = f"gpu:{self.gpus_per_worker}" if self.gpus_per_worker else None
        values = {"partition": self.partition, "account": self.account, "time": self.time,
                  "cpus-per-task": self.cpus_per_worker, "gres": gres}
        out = [f"#SBATCH --{key}={_quote(value)}" for key, value in values.items() if value]
        for line in self.sbatch_lines:
            if not re.match(r"#SBATCH\s+-", line.strip()):
                raise SlurmError(f"--sbatch-line {line!r}: expected a whole line such as '#SBATCH --qos=long'")
            out.append(line.strip())
        return out


def _quote(value: Any) -> str:
    """An ``#SBATCH`` value: sbatch splits its lines on whitespace unless quoted."""
    text = str(value)
    return f'"{text}"' if re.search(r"\s", text) else text


def storage_problem(url: str | None) -> str | None:
    """Why the nodes of a cluster could not reach the storage ``url`` (None when they may)."""
    if not url:
        return "no --storage was given, so the study would be a journal file under --root on this machine"
    if not is_rdb(url):
        return f"--storage {url} is a journal file, which workers on other nodes cannot lock safely"
    try:
        parsed = make_url(str(url))
    except ArgumentError:
        return f"--storage {url!r} is not a database URL"
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite":
        return f"--storage {shown} is an SQLite file on this machine"
    host = parsed.host or str(parsed.query.get("host") or "")
    if not host or host.startswith("/"):
        return f"--storage {shown} reaches the database through a local socket"
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host.lower() in LOCAL_HOSTS
    if loopback:
        return f"--storage {shown} names this machine ({host}), not an address the other nodes can reach"
    return None


def check_shared_storage(url: str | None, allow_local: bool = False) -> None:
    """Refuse a storage that other nodes cannot reach, unless ``allow_local`` (a one-node cluster)."""
    problem = storage_problem(url)
    if problem and not allow_local:
        raise SlurmError(f"--launcher slurm runs workers on other nodes, which must all reach the study's storage: "
                         f"{problem}. Give --storage postgresql://USER@DBHOST/DB with a DBHOST every node reaches "
                         "(or --allow-local-storage on a one-node cluster)")


def worker_command(spec: Path, study: str, storage: str | None, root: Path, preset: str | None = None,
                   seeds: int | None = None, sets: list[str] | tuple[str, ...] = (),
                   trial_timeout: float | None = None, trials: int | None = None,
                   archive: Path | None = None) -> list[str]:
    """One array task's command: a one-process worker on the shared study, with absolute paths."""
    cmd = [sys.executable, "-m", "istr", "sweep", str(spec), "--workers", "1", "--no-wait", "--array-task",
           "--name", study, "--root", str(root)]
    options: list[tuple[str, Any]] = [("--storage", storage), ("--preset", preset), ("--seeds", seeds),
                                      ("--trial-timeout", trial_timeout), ("--trials", trials),
                                      ("--archive", archive)]
    for flag, value in options:
        if value is not None:
            cmd += [flag, str(value)]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def sbatch_script(study: str, workers: int, command: list[str], options: SlurmOptions, log_dir: Path,
                  chdir: Path) -> str:
    """The array's batch script: ``workers`` tasks, each ``exec``-ing ``command`` (so signals reach the worker)."""
    lines = ["#!/bin/bash",
             f"# istr sweep {study}: {workers} worker(s) on the study's shared storage; written {utc_now()} by "
             "istr sweep --launcher slurm",
             f"#SBATCH --job-name={_quote(f'istr-{study}')}",
             f"#SBATCH --array=0-{workers - 1}",
             "#SBATCH --ntasks=1",
             f"#SBATCH --signal={SIGNAL}",
             f"#SBATCH --output={_quote(log_dir / '%A_%a.out')}",
             f"#SBATCH --chdir={_quote(chdir)}",
             *options.lines(),
             "export PYTHONUNBUFFERED=1",
             f"exec {shlex.join(command)}"]
    return "\n".join(lines) + "\n"


def _slurm(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]} not found: --launcher slurm runs where SLURM's commands are (a login node)"
                         ) from None


def submit(script: Path) -> str:
    """``sbatch`` the script; its job id."""
    proc = _slurm(["sbatch", "--parsable", str(script)])
    if proc.returncode != 0:
        raise SlurmError(f"sbatch {script} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def active_jobs(jobs: list[str]) -> list[str]:
    """The array tasks of ``jobs`` still pending or running (``squeue``)."""
    proc = _slurm(["squeue", "--noheader", "--format=%i", "--jobs", ",".join(jobs)])
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:  # every one of them finished and left the controller's memory
            return []
        raise SlurmError(f"squeue failed: {proc.stderr.strip()}")
    return proc.stdout.split()


def wait_for_jobs(jobs: list[str], poll_s: float = POLL_S) -> None:
    """Until every task of ``jobs`` has ended; a squeue error three times running is a :class:`SlurmError`."""
    errors = 0
    while True:
        try:
            if not active_jobs(jobs):
                return
            errors = 0
        except SlurmError:
            errors += 1
            if errors >= 3:
                raise
        time.sleep(poll_s)


def status_command(study: str, storage: str | None, root: Path) -> str:
    """The ``istr sweep status`` command line that shows this study from any machine."""
    return shlex.join(["istr", "sweep", "status", study, *(["--storage", storage] if storage else []),
                       "--root", str(root)])


def record_job(study: optuna.Study, plan: SweepPlan, job: str) -> None:
    """Add ``job`` to the study's ``slurm_jobs`` user attr (what ``istr sweep cancel`` scancels)."""
    with storage_lock(plan.storage_url, Path(plan.root), plan.study):
        jobs = [*study.user_attrs.get("slurm_jobs", []), job]
        study.set_user_attr("slurm_jobs", jobs)


def submit_sweep(spec_path: str | Path, options: SlurmOptions, preset: str | None = None, seeds: int | None = None,
                 sets: list[str] | tuple[str, ...] = (), study_name: str | None = None, workers: int = 1,
                 storage_url: str | None = None, trial_timeout: float | None = None,
                 root: Path = Path("runs/sweeps"), trials: int | None = None, archive: Path | None = None,
                 allow_local_storage: bool = False, wait: bool = False, poll_s: float = POLL_S) -> dict[str, Any]:
    """Queue the study's cells and submit ``workers`` workers as one array; with ``wait``, the status at its end.

    Without ``wait`` it returns at once: the job id, the script, the logs and the command that shows the status.
    """
    check_shared_storage(storage_url, allow_local_storage)
    if workers < 1:
        raise SlurmError(f"--workers {workers}: a job array needs at least one worker")
    options.lines()  # a bad --sbatch-line fails before the study exists
    root = Path(root).absolute()
    if options.cpus_per_worker:  # each worker trains one cell on its task's CPUs; a --set still wins
        sets = [f"train.num_threads={options.cpus_per_worker}", *sets]
    spec_file = resolve_spec_path(spec_path).absolute()
    spec, plan = build_plan(spec_file, preset, seeds, sets, study_name, storage_url, trial_timeout, root, LEASE_TTL_S,
                            trials, 1, True, archive)
    cells = plan_cells(spec, plan)
    study = prepare_study(plan, cells)
    counts = status_counts(study, root)
    to_run = counts["total"] - counts["done"] if cells is not None else int(has_work(study, plan)) * workers
    out: dict[str, Any] = {"study": plan.study, "status": status_command(plan.study, storage_url, root)}
    if to_run <= 0:
        return {**out, **counts, "job": None}
    if needs_training(plan, cells):
        prepare_shared(plan)
    n = min(workers, to_run)
    slurm_dir = study_dir(root, plan.study) / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    command = worker_command(spec_file, plan.study, storage_url, root, Path(plan.preset).absolute().as_posix(), seeds,
                             sets, trial_timeout, trials, Path(archive).absolute() if archive else None)
    script = slurm_dir / f"sweep-{utc_now().replace(':', '')}.sh"
    script.write_text(sbatch_script(plan.study, n, command, options, slurm_dir, Path.cwd()))
    job = submit(script)
    record_job(study, plan, job)
    out.update(job=job, workers=n, script=script.as_posix(), logs=(slurm_dir / f"{job}_*.out").as_posix())
    if not wait:
        return out
    print(f"submitted SLURM job array {job} ({n} workers); waiting for it to end", file=sys.stderr, flush=True)
    wait_for_jobs([job], poll_s)
    write_results(study, root)
    counts = status_counts(study, root)
    counts["results"] = (study_dir(root, plan.study) / "results.csv").as_posix()
    return {**counts, "job": job}


def cancel_study(study: str, storage: str | None = None, root: Path = Path("runs/sweeps")) -> tuple[list[str], str]:
    """``scancel`` the study's array jobs: every worker hands its running cell back to the queue and ends.

    Returns the job ids and what scancel said (nothing, normally; finished jobs are no error).
    """
    loaded = load_existing(study, storage, Path(root))
    jobs = [str(j) for j in loaded.user_attrs.get("slurm_jobs") or []]
    if not jobs:
        raise SlurmError(f"study '{study}' has no SLURM jobs recorded (it was not submitted with --launcher slurm)")
    proc = _slurm(["scancel", *jobs])
    if proc.returncode != 0:
        raise SlurmError(f"scancel {' '.join(jobs)} failed: {proc.stderr.strip()}")
    return jobs, proc.stderr.strip()
