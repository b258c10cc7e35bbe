"""``run_sweep``: a W&B sweep spec run with Optuna, resumable by re-running the same command.

Per call: open (or create) the study, fail stale RUNNING trials (dead worker, expired lease,
lost heartbeat), enqueue every grid cell that has no COMPLETE/RUNNING/WAITING trial (so failed
cells are re-run and a grid never silently skips one — Optuna's GridSampler is not used), then
run ``workers`` worker processes that pop trials until none is waiting (grid) or the trial
budget is spent (random -> RandomSampler, bayes -> TPESampler). ``results.csv`` is rewritten
after every trial.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from istr.config import load_config
from istr.sweep.records import status_counts, write_results
from istr.sweep.spec import load_spec, resolve_preset
from istr.sweep.storage import LEASE_TTL_S, file_lock, open_storage, reap_stale_trials, study_dir
from istr.sweep.trial import SweepPlan, run_trial

optuna.logging.set_verbosity(optuna.logging.WARNING)
MAX_CONSECUTIVE_FAILURES = 3


def make_sampler(method: str) -> optuna.samplers.BaseSampler:
    if method == "bayes":
        return optuna.samplers.TPESampler()
    return optuna.samplers.RandomSampler()  # grid cells are enqueued; random draws


def _open_study(plan: SweepPlan) -> optuna.Study:
    storage = open_storage(plan.storage_url, Path(plan.root), plan.study)
    return optuna.create_study(study_name=plan.study, storage=storage, direction=plan.goal,
                               sampler=make_sampler(plan.method), load_if_exists=True)


def prepare_study(plan: SweepPlan, cells: list | None) -> optuna.Study:
    """Create/load the study, reap stale trials and enqueue the grid cells not yet covered."""
    root = Path(plan.root)
    with file_lock(study_dir(root, plan.study) / ".enqueue.lock"):
        study = _open_study(plan)
        for key, value in {"axis": plan.axis, "method": plan.method, "metric": plan.metric,
                           "preset": plan.preset, "n_trials": plan.n_trials}.items():
            if study.user_attrs.get(key) != value:
                study.set_user_attr(key, value)
        reap_stale_trials(study, study._storage, root, plan.lease_ttl)
        if cells is None:
            return study
        ids = []
        covered = {t.user_attrs.get("cell_id") for t in study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING))}
        for cell in cells:
            cell_id = _cell_id(plan, cell.params)
            ids.append(cell_id)
            if cell_id not in covered:
                covered.add(cell_id)
                study.enqueue_trial(cell.params, user_attrs={
                    "cell_id": cell_id, "arm": cell.arm, "seed": cell.seed, "axis": plan.axis,
                    "preset": Path(plan.preset).stem})
        if study.user_attrs.get("cell_ids") != ids:
            study.set_user_attr("cell_ids", ids)
    return study


def _cell_id(plan: SweepPlan, params: dict[str, Any]) -> str:
    from istr.engine.train import check_arms
    from istr.sweep.spec import cell_identity

    cfg = load_config(plan.preset, plan.overrides(params))
    check_arms(cfg)  # a typo in a spec's arm fails here, before any trial trains
    return cell_identity(cfg)


def worker_loop(plan: SweepPlan, on_trial=None) -> int:
    """Pop and run trials until the grid has none waiting or the budget is spent; trials run."""
    study = _open_study(plan)
    ran, failures = 0, 0
    while failures < MAX_CONSECUTIVE_FAILURES:
        if plan.method == "grid":
            if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                break
        elif len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))) >= plan.n_trials:
            break
        trial = study.ask()
        if plan.method == "grid" and "cell_id" not in trial.user_attrs:
            study.tell(trial, state=TrialState.PRUNED)  # another worker took the last waiting cell
            break
        try:
            state, value = run_trial(study, trial, plan)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        if state == TrialState.COMPLETE:
            study.tell(trial, value)
            failures = 0
        else:
            study.tell(trial, state=state)
            failures += state == TrialState.FAIL
        ran += 1
        write_results(study, Path(plan.root))
        if on_trial:
            on_trial()
    return ran


def _worker_main(plan: SweepPlan) -> None:
    worker_loop(plan)


def threads_per_trial(workers: int) -> int:
    """CPU threads per training when ``workers`` trials share this machine (0 = torch's default).

    Several trainings each using every core oversubscribe the CPU and run many times slower.
    """
    return max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0


def build_plan(spec_path, preset=None, seeds=None, sets=(), study_name=None, storage_url=None,
               trial_timeout=None, root=Path("runs/sweeps"), lease_ttl=LEASE_TTL_S, trials=None, workers=1):
    spec = load_spec(spec_path).with_seeds(seeds)
    preset_path = resolve_preset(preset or spec.preset)
    name = study_name or f"{spec.axis}-{preset_path.stem}"
    plan = SweepPlan(study=name, axis=spec.axis, method=spec.method, metric=spec.metric, goal=spec.goal,
                     preset=preset_path.as_posix(), parameters=spec.parameters, sets=list(sets),
                     storage_url=storage_url, root=str(root), trial_timeout=trial_timeout,
                     lease_ttl=lease_ttl, n_trials=trials or spec.run_cap,
                     threads_per_trial=threads_per_trial(workers))
    return spec, plan


def run_sweep(spec_path: str | Path, preset: str | None = None, seeds: int | None = None,
              sets: list[str] | tuple[str, ...] = (), study_name: str | None = None, workers: int = 1,
              storage_url: str | None = None, trial_timeout: float | None = None,
              root: Path = Path("runs/sweeps"), lease_ttl: float = LEASE_TTL_S,
              progress: bool | None = None, trials: int | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep; returns :func:`istr.sweep.records.status_counts` + results path.

    ``trials`` is the budget of a random/bayes spec (default: the spec's W&B ``run_cap``); a grid runs its cells.
    """
    spec, plan = build_plan(spec_path, preset, seeds, sets, study_name, storage_url, trial_timeout, root, lease_ttl,
                            trials, workers)
    study = prepare_study(plan, spec.cells() if spec.method == "grid" else None)
    counts = status_counts(study)
    bar = tqdm(total=counts["total"], initial=counts["done"], desc=f"sweep {plan.study}", unit="cell",
               disable=(not progress) if progress is not None else None)
    try:
        if workers <= 1:
            worker_loop(plan, on_trial=lambda: _refresh(bar, study))
        else:
            ctx = multiprocessing.get_context("spawn")
            procs = [ctx.Process(target=_worker_main, args=(plan,), name=f"sweep-worker-{i}") for i in range(workers)]
            for proc in procs:
                proc.start()
            try:
                while any(p.is_alive() for p in procs):
                    time.sleep(1.0)
                    _refresh(bar, study)
            finally:
                for proc in procs:
                    proc.join()
    finally:
        bar.close()
    write_results(study, Path(plan.root))
    counts = status_counts(study)
    counts["results"] = (study_dir(Path(plan.root), plan.study) / "results.csv").as_posix()
    return counts


def _refresh(bar: tqdm, study: optuna.Study) -> None:
    done = status_counts(study)["done"]
    if done > bar.n:
        bar.update(done - bar.n)
