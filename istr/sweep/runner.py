"""``run_sweep``: a W&B sweep spec run with Optuna, resumable by re-running the same command.

Per call: validate the spec and every grid cell's config (before any storage exists), then, under
the storage's own lock (:func:`istr.sweep.storage.storage_lock`, a PostgreSQL advisory lock for an
RDB), open or create the study, fail stale RUNNING trials and enqueue every grid cell that has no
COMPLETE/RUNNING/WAITING trial — so any number of machines queue a grid once. ``workers`` worker
processes then pop waiting trials (grid) or ask for new ones until the budget is spent (random ->
RandomSampler, bayes -> TPESampler, with the spec's ``early_terminate`` as pruner). A machine then
waits while cells run elsewhere, re-queueing those whose worker died, and ends only when none is
pending or running anywhere (or at once with ``wait=False``). ``results.csv`` is rebuilt from the
storage after every trial.

A worker signalled with SIGUSR1/SIGTERM (SLURM's time-limit warning, scancel, preemption) has its
training checkpoint and stop, fails the trial with reason ``preempted``, queues its cell again at once
(:func:`requeue_cell`, no lease has to expire) and ends; any worker then resumes the cell.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from istr.config import ConfigError, load_config
from istr.data.build import ensure_dataset
from istr.engine.pretrain import resolve_backbone_weights
from istr.engine.train import check_arms
from istr.registry import UnknownArmError
from istr.sweep.records import progress_line, status_counts, write_results
from istr.sweep.spec import Cell, SpecError, cell_identity, load_spec, param_overrides, resolve_preset
from istr.sweep.storage import LEASE_TTL_S, open_storage, reap_stale_trials, storage_lock, study_dir
from istr.sweep.trial import PREEMPTED, PREEMPTION, SweepPlan, find_done, run_trial

optuna.logging.set_verbosity(optuna.logging.WARNING)
MAX_CONSECUTIVE_FAILURES = 3
POLL_S = 5.0
BUDGET_STATES = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED)
QUEUED = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)  # a cell with one of these needs no new trial
CELL_ATTRS = ("cell_id", "arm", "seed", "axis", "preset")


def make_sampler(method: str) -> optuna.samplers.BaseSampler:
    if method == "bayes":
        return optuna.samplers.TPESampler()
    return optuna.samplers.RandomSampler()  # grid cells are enqueued; random draws


def make_pruner(early_terminate: dict[str, Any] | None) -> optuna.pruners.BasePruner:
    """W&B's ``early_terminate: {type: hyperband, min_iter, max_iter, eta}`` -> Optuna's HyperbandPruner."""
    if not early_terminate:
        return optuna.pruners.NopPruner()
    return optuna.pruners.HyperbandPruner(min_resource=int(early_terminate.get("min_iter", 1)),
                                          max_resource=early_terminate.get("max_iter", "auto"),
                                          reduction_factor=int(early_terminate.get("eta", 3)))


def _open_study(plan: SweepPlan) -> optuna.Study:
    storage = open_storage(plan.storage_url, Path(plan.root), plan.study)
    return optuna.create_study(study_name=plan.study, storage=storage, direction=plan.goal,
                               sampler=make_sampler(plan.method), pruner=make_pruner(plan.early_terminate),
                               load_if_exists=True)


def _enqueue(study: optuna.Study, plan: SweepPlan, cells: dict[str, Cell]) -> None:
    """Enqueue the cells with no COMPLETE/RUNNING/WAITING trial (the caller holds the storage lock)."""
    covered = {t.user_attrs.get("cell_id") for t in study.get_trials(deepcopy=False, states=QUEUED)}
    for cell_id, cell in cells.items():
        if cell_id not in covered:
            study.enqueue_trial(cell.params, user_attrs={
                "cell_id": cell_id, "arm": cell.arm, "seed": cell.seed, "axis": plan.axis,
                "preset": Path(plan.preset).stem})


def prepare_study(plan: SweepPlan, cells: dict[str, Cell] | None) -> optuna.Study:
    """Create/load the study, reap stale trials and enqueue the grid cells not yet covered."""
    with storage_lock(plan.storage_url, Path(plan.root), plan.study):
        study = _open_study(plan)
        for key, value in {"axis": plan.axis, "method": plan.method, "metric": plan.metric,
                           "preset": plan.preset, "n_trials": plan.n_trials}.items():
            if study.user_attrs.get(key) != value:
                study.set_user_attr(key, value)
        reap_stale_trials(study, Path(plan.root), plan.lease_ttl)
        if cells is not None:
            _enqueue(study, plan, cells)
            if study.user_attrs.get("cell_ids") != list(cells):
                study.set_user_attr("cell_ids", list(cells))
    return study


def requeue_stale(study: optuna.Study, plan: SweepPlan, cells: dict[str, Cell] | None) -> None:
    """Fail the trials whose worker died (on any machine) and queue their cells again."""
    with storage_lock(plan.storage_url, Path(plan.root), plan.study):
        reaped = reap_stale_trials(study, Path(plan.root), plan.lease_ttl)
        if cells is not None and reaped:
            ids = {t.user_attrs.get("cell_id") for t in reaped}
            _enqueue(study, plan, {k: v for k, v in cells.items() if k in ids})


def requeue_cell(study: optuna.Study, plan: SweepPlan, trial_id: int) -> bool:
    """Queue a preempted trial's cell again at once, unless it is queued, running or done; True if queued.

    The same parameters and cell attrs as the grid's own queue, so any worker resumes the cell from its checkpoint.
    """
    frozen = study._storage.get_trial(trial_id)
    cell_id = frozen.user_attrs.get("cell_id")
    with storage_lock(plan.storage_url, Path(plan.root), plan.study):
        if any(t.user_attrs.get("cell_id") == cell_id for t in study.get_trials(deepcopy=False, states=QUEUED)):
            return False
        study.enqueue_trial(frozen.params, user_attrs={k: frozen.user_attrs[k] for k in CELL_ATTRS
                                                        if k in frozen.user_attrs})
    return True


def pop_waiting(study: optuna.Study) -> optuna.Trial | None:
    """Take a WAITING trial (atomically: another machine may take it first); None when none is left.

    Unlike ``study.ask()`` this never creates a trial, so a grid study holds one trial per cell.
    """
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if study._storage.set_trial_state_values(frozen._trial_id, TrialState.RUNNING):
                return optuna.Trial(study, frozen._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def has_work(study: optuna.Study, plan: SweepPlan) -> bool:
    if plan.method == "grid":
        return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    return len(study.get_trials(deepcopy=False, states=BUDGET_STATES)) < plan.n_trials


def next_trial(study: optuna.Study, plan: SweepPlan) -> optuna.Trial | None:
    """The next trial this worker runs: a queued grid cell, or a new draw while the budget lasts."""
    if plan.method == "grid":
        return pop_waiting(study)
    with storage_lock(plan.storage_url, Path(plan.root), plan.study):
        if not has_work(study, plan):
            return None
        with warnings.catch_warnings():  # we record heartbeats ourselves, outside Study.optimize
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            return study.ask()


def worker_loop(plan: SweepPlan, on_trial=None) -> bool:
    """Run trials until none is left for this worker; True when it gave up after repeated failures.

    A SIGUSR1/SIGTERM ends it after the trial at hand (:class:`istr.sweep.trial.Preemption`): a cell it
    interrupted is failed as ``preempted`` and queued again.
    """
    study = _open_study(plan)
    failures = 0
    with PREEMPTION.installed():
        while failures < MAX_CONSECUTIVE_FAILURES and PREEMPTION.signum is None:
            trial = next_trial(study, plan)
            if trial is None:
                return False
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
                if trial.user_attrs.get("fail_reason") == PREEMPTED:
                    requeue_cell(study, plan, trial._trial_id)
                else:
                    failures += state == TrialState.FAIL
            write_results(study, Path(plan.root))
            if plan.log_lines:
                print(progress_line(study, "end", trial._trial_id), flush=True)
            if on_trial:
                on_trial()
    return failures >= MAX_CONSECUTIVE_FAILURES


def _worker_main(plan: SweepPlan) -> None:
    sys.exit(3 if worker_loop(plan) else 0)


def threads_per_trial(workers: int) -> int:
    """CPU threads per training when ``workers`` trials share this machine (0 = torch's default).

    Several trainings each using every core oversubscribe the CPU and run many times slower.
    """
    return max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0


def build_plan(spec_path, preset=None, seeds=None, sets=(), study_name=None, storage_url=None,
               trial_timeout=None, root=Path("runs/sweeps"), lease_ttl=LEASE_TTL_S, trials=None, workers=1,
               log_lines=False, archive=None):
    spec = load_spec(spec_path).with_seeds(seeds)
    preset_path = resolve_preset(preset or spec.preset)
    name = study_name or f"{spec.axis}-{preset_path.stem}"
    plan = SweepPlan(study=name, axis=spec.axis, method=spec.method, metric=spec.metric, goal=spec.goal,
                     preset=preset_path.as_posix(), parameters=spec.parameters, sets=list(sets),
                     storage_url=storage_url, root=str(root), trial_timeout=trial_timeout,
                     lease_ttl=lease_ttl, n_trials=trials or spec.run_cap,
                     threads_per_trial=threads_per_trial(workers), early_terminate=spec.early_terminate,
                     log_lines=log_lines, archive=str(archive) if archive else None)
    return spec, plan


def plan_cells(spec, plan: SweepPlan) -> dict[str, Cell] | None:
    """Every grid cell by id, each config resolved (so a bad value fails before any storage exists).

    A random/bayes spec has no cells; one draw at each parameter's bounds is resolved instead.
    """
    def resolve(params: dict[str, Any]) -> str:
        try:
            cfg = load_config(plan.preset, plan.overrides(params))
            check_arms(cfg)  # a typo in a spec's arm fails here, before any trial trains
            return cell_identity(cfg)
        except (ConfigError, UnknownArmError) as err:
            raise SpecError(f"{spec.path}: parameters {param_overrides(params)} on {plan.preset}: {err}") from err

    if spec.method == "grid":
        return {resolve(cell.params): cell for cell in spec.cells()}
    for bound in ("min", "max"):
        resolve({k: p["values"][0] if "values" in p else p.get("value", p.get(bound))
                 for k, p in spec.parameters.items()})
    return None


def needs_training(plan: SweepPlan, cells: dict[str, Cell] | None) -> bool:
    """Whether any cell may still train here: a random/bayes draw, or a grid cell with no finished run."""
    archive = Path(plan.archive) if plan.archive else None
    return cells is None or any(find_done(Path(plan.root), plan.study, cell_id, archive) is None for cell_id in cells)


def grid_cells(spec_path: str | Path, preset: str | None = None, seeds: int | None = None,
               sets: list[str] | tuple[str, ...] = ()) -> dict[str, Cell]:
    """A grid spec's cells by id, as :func:`run_sweep` would queue them (each config resolved and checked)."""
    spec, plan = build_plan(spec_path, preset, seeds, sets)
    cells = plan_cells(spec, plan)
    if cells is None:
        raise SpecError(f"{spec.path}: a {spec.method} spec has no grid cells")
    return cells


def prepare_shared(plan: SweepPlan) -> None:
    """The base config's generated dataset and ``auto`` backbone, made once here: parallel trials would race."""
    cfg = load_config(plan.preset, plan.base_overrides())
    ensure_dataset(cfg.data)
    resolve_backbone_weights(cfg)


def _run_workers(plan: SweepPlan, workers: int, study: optuna.Study, bar: tqdm) -> bool:
    """``workers`` workers on this machine until they run out of trials; True if one gave up."""
    if workers <= 1:
        return worker_loop(plan, on_trial=lambda: _refresh(bar, study))
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
    return any(p.exitcode for p in procs)


def run_sweep(spec_path: str | Path, preset: str | None = None, seeds: int | None = None,
              sets: list[str] | tuple[str, ...] = (), study_name: str | None = None, workers: int = 1,
              storage_url: str | None = None, trial_timeout: float | None = None,
              root: Path = Path("runs/sweeps"), lease_ttl: float = LEASE_TTL_S,
              progress: bool | None = None, trials: int | None = None, wait: bool = True,
              poll_s: float = POLL_S, archive: Path | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep; returns :func:`istr.sweep.records.status_counts` + results path.

    ``trials`` is the budget of a random/bayes spec (default: the spec's W&B ``run_cap``); a grid runs its
    cells. ``progress``: True a progress bar, False nothing, None a bar on a terminal and one line per
    cell start/end otherwise. ``wait``: after this machine's work, wait for the cells running elsewhere.
    ``archive``: the cell archive (:mod:`istr.sweep.archive`), read for finished cells and added to.
    """
    log_lines = progress is None and not sys.stdout.isatty()
    PREEMPTION.reset()
    spec, plan = build_plan(spec_path, preset, seeds, sets, study_name, storage_url, trial_timeout, root, lease_ttl,
                            trials, workers, log_lines, archive)
    cells = plan_cells(spec, plan)
    study = prepare_study(plan, cells)
    if needs_training(plan, cells):  # all archived: no data to generate and no backbone to pretrain
        prepare_shared(plan)
    counts = status_counts(study, Path(plan.root))
    bar = tqdm(total=counts["total"], initial=counts["done"], desc=f"sweep {plan.study}", unit="cell",
               disable=not progress if progress is not None else log_lines)
    try:
        gave_up = _run_workers(plan, workers, study, bar)
        announced = None
        while not gave_up and PREEMPTION.signum is None:
            requeue_stale(study, plan, cells)
            if has_work(study, plan):
                gave_up = worker_loop(plan, on_trial=lambda: _refresh(bar, study))
                continue
            counts = status_counts(study, Path(plan.root))
            if not counts["running"] or not wait:
                break
            if counts["running_cells"] != announced:
                announced = counts["running_cells"]
                print(f"sweep {plan.study}: waiting for {len(announced)} cell(s) running elsewhere: "
                      + "; ".join(announced), file=sys.stderr, flush=True)
            time.sleep(poll_s)
            _refresh(bar, study)
    finally:
        bar.close()
    write_results(study, Path(plan.root))
    counts = status_counts(study, Path(plan.root))
    counts["results"] = (study_dir(Path(plan.root), plan.study) / "results.csv").as_posix()
    if PREEMPTION.signum is not None:
        counts["preempted"] = PREEMPTION.name
    return counts


def _refresh(bar: tqdm, study: optuna.Study) -> None:
    done = status_counts(study)["done"]
    if done > bar.n:
        bar.update(done - bar.n)
