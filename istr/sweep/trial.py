"""One sweep trial: resolve the cell, reuse a finished run dir or train it in a subprocess.

The training runs as ``python -m istr train --config PRESET k=v ... --out <root>/<study>/<cell-id>``
in its own process (a crash or OOM kills only that trial), resumed with ``--resume`` when a
killed earlier attempt left ``checkpoints/last.pt``. While it runs, the worker renews the trial's
lease file (and the RDB heartbeat) every ``lease_ttl / 6`` seconds.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from istr.config import ConfigError, load_config
from istr.io import atomic_write_json
from istr.results import arm_name, flat_metrics
from istr.sweep.records import TRIAL_RECORD, _read_json, codec_record
from istr.sweep.spec import cell_identity, param_overrides
from istr.sweep.storage import HOST, LEASE_TTL_S, lease_path, utc_now, write_lease

_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1


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

    def base_overrides(self) -> list[str]:
        """W&B logging for every trial (``--set logging.wandb=false`` turns it off), the CPU threads of
        each trial when several share the machine, then ``--set`` (which wins)."""
        threads = [f"train.num_threads={self.threads_per_trial}"] if self.threads_per_trial else []
        return ["logging.wandb=true", f"logging.wandb_group={self.study}",
                f"logging.wandb_job_type={self.axis}", "logging.progress=false", *threads, *self.sets]

    def overrides(self, params: dict[str, Any]) -> list[str]:
        return [*self.base_overrides(), *param_overrides(params)]


def suggest(trial: optuna.Trial, parameters: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """W&B parameter specs -> Optuna suggestions (enqueued grid cells come back as fixed values)."""
    out: dict[str, Any] = {}
    for key, p in parameters.items():
        if "values" in p:
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


def find_done(root: Path, study: str, cell_id: str) -> Path | None:
    """A finished run dir of this cell under the same root: this study's first, then any other."""
    own = root / study / cell_id
    if (own / "eval.json").is_file():
        return own
    for cand in sorted(root.glob(f"*/{cell_id}/eval.json")):
        return cand.parent
    return None


def metric_value(run_dir: Path, metric: str) -> float:
    ev = _read_json(run_dir / "eval.json")
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


def train_cell(study: optuna.Study, trial: optuna.Trial, plan: SweepPlan, cell_id: str,
               overrides: list[str], run_dir: Path) -> tuple[TrialState, str]:
    """Run ``istr train`` for the cell in a subprocess, renewing the lease; (state, reason)."""
    root = Path(plan.root)
    lease = lease_path(root, plan.study, trial.number)
    _renew(study, trial, lease, cell_id, plan.lease_ttl)
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "istr", "train", "--config", plan.preset, *overrides, "--out", str(run_dir)]
    if (run_dir / "checkpoints" / "last.pt").is_file():
        cmd.append("--resume")
    started = time.perf_counter()
    interval = max(plan.lease_ttl / 6.0, 0.5)
    with open(run_dir / "train.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_child_setup)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=interval)
                    break
                except subprocess.TimeoutExpired:
                    _renew(study, trial, lease, cell_id, plan.lease_ttl)
                    if plan.trial_timeout and time.perf_counter() - started > plan.trial_timeout:
                        proc.kill()
                        proc.wait()
                        return TrialState.FAIL, f"timeout after {plan.trial_timeout:.0f}s"
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            lease.unlink(missing_ok=True)
    wall = time.perf_counter() - started
    if rc != 0 or not (run_dir / "eval.json").is_file():
        return TrialState.FAIL, f"istr train exited {rc}; see {run_dir / 'train.log'}"
    atomic_write_json(run_dir / TRIAL_RECORD, {"wall_s": wall, "finished_at": utc_now(), "study": plan.study,
                                               "trial": trial.number})
    return TrialState.COMPLETE, ""


def _duplicate_running(study: optuna.Study, trial: optuna.Trial, cell_id: str) -> bool:
    return any(t.number < trial.number and t.user_attrs.get("cell_id") == cell_id
               for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def run_trial(study: optuna.Study, trial: optuna.Trial, plan: SweepPlan) -> tuple[TrialState, float | None]:
    """Resolve the trial's cell and complete it (reuse or train); the caller tells Optuna."""
    params = suggest(trial, plan.parameters)
    overrides = plan.overrides(params)
    trial.set_user_attr("host", HOST)
    trial.set_user_attr("pid", os.getpid())
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
    done = find_done(root, plan.study, cell_id)
    if done is None:
        state, reason = train_cell(study, trial, plan, cell_id, overrides, root / plan.study / cell_id)
        if state != TrialState.COMPLETE:
            trial.set_user_attr("fail_reason", reason)
            return state, None
        done = root / plan.study / cell_id
    elif done.parent.name != plan.study:
        trial.set_user_attr("reused_from", done.as_posix())
    trial.set_user_attr("run_dir", done.as_posix())
    trial.set_user_attr("record", run_record(done))  # results rows on machines that cannot see the dir
    return TrialState.COMPLETE, metric_value(done, plan.metric)


def run_record(run_dir: Path) -> dict[str, Any]:
    """The run dir's eval.json + train_summary.json + sweep_trial.json + codec, copied into the storage."""
    return {"eval": _read_json(run_dir / "eval.json"), "summary": _read_json(run_dir / "train_summary.json"),
            "trial": _read_json(run_dir / TRIAL_RECORD), "codec": codec_record(run_dir)}
