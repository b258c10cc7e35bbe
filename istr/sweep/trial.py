"""One sweep trial: resolve the cell, reuse a finished run dir or train it in a subprocess.

The training runs as ``python -m istr train --config PRESET k=v ... --out <root>/<study>/<cell-id>``
in its own process (a crash or OOM kills only that trial), resumed with ``--resume`` when a
killed earlier attempt left ``checkpoints/last.pt``. While it runs, the worker renews the trial's
lease file (and the RDB heartbeat) every ``lease_ttl / 6`` seconds, adds the attempt's wall time to
``sweep_trial.json`` (so a killed attempt's cost is counted when the cell is resumed), and reports
each ``train.eval_every`` evaluation the child appends to ``metrics.jsonl`` to Optuna
(``trial.report``), stopping the child when the study's pruner says so.

A SIGUSR1 (SLURM's warning before the time limit) or SIGTERM (scancel, preemption) to the worker is
passed on to the child, which checkpoints the step it is on and exits ``PREEMPTED_EXIT``
(istr/engine/preemption.py); the trial then fails with reason ``preempted`` and the runner queues its cell
again at once (:class:`Preemption`), to resume from that checkpoint on any worker.

The child's W&B run is named ``<axis>/<arm>/s<seed>`` and tagged with the axis, arm, seed, study and
cell id (``WANDB_NAME``/``WANDB_TAGS``, W&B's own variables, which the cell identity ignores).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from istr.config import ConfigError, load_config
from istr.engine.preemption import PREEMPT_SIGNALS, PREEMPTED_EXIT
from istr.engine.rundir import claim_run_dir, marker
from istr.io import atomic_write_json
from istr.results import CHECKPOINT_FILE, EVAL_FILE, METRICS_FILE, TRAIN_LOG, TRIAL_RECORD, arm_name, flat_metrics
from istr.sweep.archive import archive_cell, archived
from istr.sweep.records import _read_json, progress_line, run_columns
from istr.sweep.spec import cell_identity, param_overrides
from istr.sweep.storage import HOST, LEASE_TTL_S, lease_path, utc_now, write_lease

_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1
PREEMPTED = "preempted"  # the fail_reason of a trial whose worker was signalled: its cell is queued again
PREEMPT_GRACE_S = 20.0  # after a signal, how long the child may take to checkpoint before it is killed
SLURM_ATTRS = {"slurm_job_id": "SLURM_ARRAY_JOB_ID", "slurm_array_task_id": "SLURM_ARRAY_TASK_ID"}


class Preemption:
    """A worker's SIGUSR1/SIGTERM: remembered, and passed on to the running ``istr train`` child.

    The handler only records the signal (and forwards it), never raises: the worker stops at its next
    safe point (the child's exit, or before taking a trial), so the trial is told and its cell queued
    again before the process ends. Outside :meth:`installed` the signals keep their default action.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.at = 0.0
        self.child: subprocess.Popen | None = None

    def reset(self) -> None:
        """Forget an earlier signal: a new sweep in this process (a worker process ends after one)."""
        self.signum, self.child = None, None

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is None:
            self.signum, self.at = signum, time.monotonic()
        self.forward()

    def forward(self) -> None:
        """Pass the signal on to the running child (it may have had it already: scancel signals every process)."""
        child = self.child
        if self.signum is not None and child is not None and child.returncode is None:
            try:
                os.kill(child.pid, self.signum)
            except ProcessLookupError:
                pass

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    @contextmanager
    def installed(self) -> Iterator[None]:
        """The handlers, for a worker loop in the main thread; the previous ones come back after it."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.reset()
        previous = {s: signal.signal(s, self._handle) for s in PREEMPT_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


PREEMPTION = Preemption()  # one per process: signal handlers are per process


@dataclass
class SweepPlan:
    """Everything a worker needs (picklable: sent to spawned worker processes)."""

    study: str
    axis: str
    method: str
    metric: str
    goal: str
    preset: str
    parameters: dict[str, dict[str, Any]]
    sets: list[str] = field(default_factory=list)
    storage_url: str | None = None
    root: str = "runs/sweeps"
    trial_timeout: float | None = None
    lease_ttl: float = LEASE_TTL_S
    n_trials: int = 0
    threads_per_trial: int = 0  # 0 = torch's default
    early_terminate: dict[str, Any] | None = None  # the spec's W&B early_terminate (-> Optuna pruner)
    log_lines: bool = False  # print one line per cell start/end (off a terminal)
    archive: str | None = None  # the cell archive (istr/sweep/archive.py): finished cells are copied there

    def base_overrides(self) -> list[str]:
        """W&B logging for every trial (``--set logging.wandb=false`` turns it off), the CPU threads of
        each trial when several share the machine, then ``--set`` (which wins)."""
        threads = [f"train.num_threads={self.threads_per_trial}"] if self.threads_per_trial else []
        return ["logging.wandb=true", f"logging.wandb_group={self.study}",
                f"logging.wandb_job_type={self.axis}", "logging.progress=false", *threads, *self.sets]

    def overrides(self, params: dict[str, Any]) -> list[str]:
        return [*self.base_overrides(), *param_overrides(params)]


def _is_int_grid(values: list) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def suggest(trial: optuna.Trial, parameters: dict[str, dict[str, Any]], grid: bool = False) -> dict[str, Any]:
    """W&B parameter specs -> Optuna suggestions (enqueued grid cells come back as fixed values).

    In a grid, integer values (seeds, codec dims) are an int range rather than a categorical: Optuna refuses a
    categorical whose choices change within a study, and ``--seeds 5`` on a 2-seed study must add cells.
    """
    out: dict[str, Any] = {}
    for key, p in parameters.items():
        if "values" in p and grid and _is_int_grid(list(p["values"])):
            out[key] = trial.suggest_int(key, min(p["values"]), max(p["values"]))
        elif "values" in p:
            out[key] = trial.suggest_categorical(key, list(p["values"]))
        elif "value" in p:
            out[key] = trial.suggest_categorical(key, [p["value"]])
        else:
            dist = p.get("distribution", "uniform")
            if dist == "int_uniform":
                out[key] = trial.suggest_int(key, int(p["min"]), int(p["max"]))
            elif dist == "categorical":
                out[key] = trial.suggest_categorical(key, list(p["values"]))
            else:
                out[key] = trial.suggest_float(key, float(p["min"]), float(p["max"]),
                                               log=dist == "log_uniform_values",
                                               step=p.get("q") if dist == "q_uniform" else None)
    return out


def find_done(root: Path, study: str, cell_id: str, archive: Path | None = None) -> Path | None:
    """A finished run of this cell: this study's run dir, the archive's record, then another study's run dir."""
    own = root / study / cell_id
    if (own / EVAL_FILE).is_file():
        return own
    record = archived(archive, cell_id)
    if record is not None:
        return record
    for cand in sorted(root.glob(f"*/{cell_id}/{EVAL_FILE}")):
        return cand.parent
    return None


def metric_value(run_dir: Path, metric: str) -> float:
    ev = _read_json(run_dir / EVAL_FILE)
    value = flat_metrics(ev).get(metric)
    return 0.0 if value is None else float(value)


def _child_setup() -> None:  # runs in the child between fork and exec: die with the worker
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _renew(study: optuna.Study, trial: optuna.Trial, lease: Path, cell_id: str, ttl: float) -> None:
    write_lease(lease, trial.number, cell_id, ttl)
    storage = study._storage
    inner = getattr(storage, "_backend", storage)
    if isinstance(inner, RDBStorage):
        inner.record_heartbeat(trial._trial_id)


class EvalReporter:
    """Reports the ``eval/<metric>`` lines the child appends to ``metrics.jsonl`` as intermediate values."""

    def __init__(self, trial: optuna.Trial, path: Path, metric: str) -> None:
        self.trial, self.path, self.key, self.offset = trial, path, f"eval/{metric}", 0
        self.reported: set[int] = set()

    def poll(self) -> bool:
        """Report the new evaluations; True when the pruner says to stop this trial."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
        except OSError:
            return False
        lines = chunk.split(b"\n")
        self.offset += len(chunk) - len(lines[-1])  # keep a half-written last line for the next poll
        for line in lines[:-1]:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            step = record.get("step")
            if self.key in record and isinstance(step, int) and step not in self.reported:
                self.reported.add(step)
                self.trial.report(float(record[self.key]), step)
        return bool(self.reported) and self.trial.should_prune()


def wandb_env(plan: SweepPlan, cell_id: str, arm: str, seed: int) -> dict[str, str]:
    """The child's environment: its W&B run name and tags (W&B allows 64 characters a tag)."""
    tags = [f"axis:{plan.axis}", f"arm:{arm}", f"seed:{seed}", f"study:{plan.study}", f"cell:{cell_id}"]
    return {**os.environ, "WANDB_NAME": f"{plan.axis}/{arm}/s{seed}",
            "WANDB_TAGS": ",".join(t.replace(",", ";")[:64] for t in tags)}


def train_cell(study: optuna.Study, trial: optuna.Trial, plan: SweepPlan, cell_id: str,
               overrides: list[str], run_dir: Path, env: dict[str, str]) -> tuple[TrialState, str]:
    """Run ``istr train`` for the cell in a subprocess, renewing the lease; (state, reason)."""
    if PREEMPTION.signum is not None:
        return TrialState.FAIL, PREEMPTED
    root = Path(plan.root)
    lease = lease_path(root, plan.study, trial.number)
    _renew(study, trial, lease, cell_id, plan.lease_ttl)
    if marker(run_dir) is None:
        claim_run_dir(run_dir)  # so that the child's `istr train --out` may write into it
    cmd = [sys.executable, "-m", "istr", "train", "--config", plan.preset, *overrides, "--out", str(run_dir)]
    if (run_dir / CHECKPOINT_FILE).is_file():
        cmd.append("--resume")
    earlier = _read_json(run_dir / TRIAL_RECORD)  # attempts killed before they finished
    record = {"study": plan.study, "trial": trial.number, "host": HOST,
              "attempts": int(earlier.get("attempts", 0)) + 1, "wall_s": float(earlier.get("wall_s", 0.0))}
    reporter = EvalReporter(trial, run_dir / METRICS_FILE, plan.metric)
    started = time.perf_counter()
    interval = max(plan.lease_ttl / 6.0, 0.5)
    with open(run_dir / TRAIN_LOG, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_child_setup, env=env)
        PREEMPTION.child = proc
        PREEMPTION.forward()  # a signal that came before the child existed
        try:
            while True:
                try:
                    rc = proc.wait(timeout=interval if PREEMPTION.signum is None else 1.0)
                    break
                except subprocess.TimeoutExpired:
                    _renew(study, trial, lease, cell_id, plan.lease_ttl)
                    atomic_write_json(run_dir / TRIAL_RECORD,
                                      {**record, "wall_s": record["wall_s"] + time.perf_counter() - started})
                    stop = None
                    if PREEMPTION.signum is not None and time.monotonic() - PREEMPTION.at > PREEMPT_GRACE_S:
                        stop = TrialState.FAIL, PREEMPTED  # no checkpoint in time: the last periodic one is kept
                    elif plan.trial_timeout and time.perf_counter() - started > plan.trial_timeout:
                        stop = TrialState.FAIL, f"timeout after {plan.trial_timeout:.0f}s"
                    elif reporter.poll():
                        stop = TrialState.PRUNED, f"pruned at step {max(reporter.reported)}"
                    if stop:
                        proc.kill()
                        proc.wait()
                        return stop
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            PREEMPTION.child = None
            lease.unlink(missing_ok=True)
            record["wall_s"] += time.perf_counter() - started
            atomic_write_json(run_dir / TRIAL_RECORD, record)
    reporter.poll()
    finished = rc == 0 and (run_dir / EVAL_FILE).is_file()
    if not finished and (rc == PREEMPTED_EXIT or PREEMPTION.signum is not None):
        return TrialState.FAIL, PREEMPTED
    if not finished:
        return TrialState.FAIL, f"istr train exited {rc}; see {run_dir / TRAIN_LOG}"
    atomic_write_json(run_dir / TRIAL_RECORD, {**record, "finished_at": utc_now()})
    return TrialState.COMPLETE, ""


def _duplicate_running(study: optuna.Study, trial: optuna.Trial, cell_id: str) -> bool:
    return any(t.number < trial.number and t.user_attrs.get("cell_id") == cell_id
               for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def run_trial(study: optuna.Study, trial: optuna.Trial, plan: SweepPlan) -> tuple[TrialState, float | None]:
    """Resolve the trial's cell and complete it (reuse or train); the caller tells Optuna."""
    params = suggest(trial, plan.parameters, grid=plan.method == "grid")
    overrides = plan.overrides(params)
    trial.set_user_attr("host", HOST)
    trial.set_user_attr("pid", os.getpid())
    for key, var in SLURM_ATTRS.items():  # `istr sweep status` shows where a running cell's worker is
        if os.environ.get(var):
            trial.set_user_attr(key, os.environ[var])
    try:
        cfg = load_config(plan.preset, overrides)
    except ConfigError as err:
        trial.set_user_attr("fail_reason", str(err))
        return TrialState.FAIL, None
    cell_id = cell_identity(cfg)
    for key, value in {"cell_id": cell_id, "arm": arm_name(params), "seed": int(cfg.seed), "axis": plan.axis,
                       "preset": Path(plan.preset).stem}.items():
        if trial.user_attrs.get(key) != value:
            trial.set_user_attr(key, value)
    if _duplicate_running(study, trial, cell_id):
        trial.set_user_attr("fail_reason", "cell already running in an earlier trial")
        return TrialState.PRUNED, None
    root = Path(plan.root)
    if plan.log_lines:
        print(progress_line(study, "start", trial._trial_id), flush=True)
    archive = Path(plan.archive) if plan.archive else None
    done = find_done(root, plan.study, cell_id, archive)
    if done is None:
        env = wandb_env(plan, cell_id, trial.user_attrs["arm"], int(cfg.seed))
        state, reason = train_cell(study, trial, plan, cell_id, overrides, root / plan.study / cell_id, env)
        if state != TrialState.COMPLETE:
            trial.set_user_attr("fail_reason", reason)
            return state, None
        done = root / plan.study / cell_id
    elif done.parent.name != plan.study:
        trial.set_user_attr("reused_from", done.as_posix())
    if archive is not None:
        archive_cell(done, archive, cell_id)
    trial.set_user_attr("run_dir", done.as_posix())
    for key, value in run_columns(done).items():  # flat: the dashboard's table and results.csv on any machine
        if value is not None:
            trial.set_user_attr(key, value)
    return TrialState.COMPLETE, metric_value(done, plan.metric)
