"""``istr sweep`` / ``istr sweep-status``: argparse wiring for the sweep harness (``istr ablate``: istr/ablate.py).

Wire into ``istr/cli.py``'s ``build_parser`` with::

    from istr.sweep.cli import add_parsers
    add_parsers(sub)

``istr sweep status STUDY`` also works (SPEC == "status" is dispatched to the status handler),
as does the separate ``istr sweep-status STUDY``; ``istr sweep results STUDY`` rewrites the study's
``results.csv`` from the storage. ``istr sweep SPEC --launcher slurm`` submits the workers as one SLURM
job array and ``istr sweep cancel STUDY`` scancels it (istr/sweep/slurm.py, imported only here).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The options ``istr sweep`` and ``istr ablate`` share."""
    p.add_argument("--preset", default=None,
                   help="experiments/<NAME>.yaml or a YAML path (default: the spec's --config)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per cell: 0..N-1 (default: the spec's seed grid)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every trial (repeatable), e.g. --set train.max_steps=200")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine sharing the storage")
    p.add_argument("--storage", default=None, help="postgresql://... (RDB with heartbeats) or a journal file; "
                   "default runs/sweeps/<study>/journal.log")
    p.add_argument("--trial-timeout", type=float, default=None, help="seconds; a longer trial fails")
    p.add_argument("--root", default="runs/sweeps", help="where studies and cell run dirs live")


def _print_status(counts: dict) -> None:
    print(json.dumps(counts, indent=2))


def sweep_command(args: argparse.Namespace) -> None:
    """``istr sweep SPEC ...`` (or ``istr sweep status STUDY``)."""
    from istr.sweep.runner import run_sweep

    if args.spec in ("status", "results", "cancel"):
        if not args.study:
            raise FileNotFoundError(f"usage: istr sweep {args.spec} STUDY [--storage URL] [--root DIR]")
        command = {"status": status_command, "results": results_command, "cancel": cancel_command}[args.spec]
        return command(argparse.Namespace(study=args.study, storage=args.storage, root=args.root))
    if args.study:
        from istr.sweep.spec import SpecError

        raise SpecError(f"unexpected argument {args.study!r} after the spec (did you mean --name?)")
    if args.launcher == "slurm":  # before anything is made: even the --archive folder
        from istr.sweep.slurm import check_shared_storage

        check_shared_storage(args.storage, args.allow_local_storage)
    archive = None
    if args.archive:
        from istr.io import claim_output_folder

        archive = claim_output_folder(Path(args.archive), option="--archive")
    if args.launcher == "slurm":
        return slurm_command(args, archive)
    for flag, value in slurm_options(args).items():
        if value:
            from istr.sweep.spec import SpecError

            raise SpecError(f"{flag} applies to --launcher slurm only")
    counts = run_sweep(args.spec, preset=args.preset, seeds=args.seeds, sets=args.sets, study_name=args.name,
                       workers=args.workers, storage_url=args.storage, trial_timeout=args.trial_timeout,
                       root=Path(args.root), trials=args.trials, wait=not args.no_wait,
                       archive=archive)
    _print_status(counts)
    if counts.get("preempted"):  # SIGUSR1/SIGTERM: the cell at hand went back to the queue
        print(f"istr sweep: stopped by {counts['preempted']}; an interrupted cell was queued again to resume from "
              "its checkpoint", file=sys.stderr)
        raise SystemExit(128 + signal.Signals[counts["preempted"]])
    if args.array_task:  # one worker of an array: the others finish what still runs; failures still show
        if counts["failed"]:
            exit_if_unfinished({**counts, "running": 0})
        return None
    exit_if_unfinished(counts)


def slurm_options(args: argparse.Namespace) -> dict[str, object]:
    """The options only ``--launcher slurm`` reads, by flag (to refuse them without it)."""
    return {"--partition": args.partition, "--account": args.account, "--time": args.time,
            "--gpus-per-worker": args.gpus_per_worker, "--cpus-per-worker": args.cpus_per_worker,
            "--sbatch-line": args.sbatch_lines, "--allow-local-storage": args.allow_local_storage,
            "--wait": args.wait}


def slurm_command(args: argparse.Namespace, archive: Path | None) -> None:
    """``istr sweep SPEC --launcher slurm``: submit the workers as one array; ``--wait``: its status at the end."""
    from istr.sweep.slurm import SlurmOptions, submit_sweep

    options = SlurmOptions(partition=args.partition, account=args.account, time=args.time,
                           gpus_per_worker=args.gpus_per_worker or 0, cpus_per_worker=args.cpus_per_worker,
                           sbatch_lines=list(args.sbatch_lines))
    out = submit_sweep(args.spec, options, preset=args.preset, seeds=args.seeds, sets=args.sets,
                       study_name=args.name, workers=args.workers, storage_url=args.storage,
                       trial_timeout=args.trial_timeout, root=Path(args.root), trials=args.trials, archive=archive,
                       allow_local_storage=args.allow_local_storage, wait=args.wait)
    if out["job"] is None:
        print(f"sweep {out['study']}: nothing to run, every cell is done", file=sys.stderr)
        _print_status(out)
        return None
    if not args.wait:
        print(f"submitted SLURM job array {out['job']} ({out['workers']} workers) for sweep {out['study']}\n"
              f"  script: {out['script']}\n  logs:   {out['logs']}\n  status: {out['status']}\n"
              f"  cancel: {out['status'].replace(' status ', ' cancel ', 1)}")
        return None
    _print_status(out)
    exit_if_unfinished(out)


def exit_if_unfinished(counts: dict) -> None:
    """Exit non-zero, saying why, unless every cell of the study is done (3: some still run elsewhere)."""
    if counts["running"]:
        print(f"istr sweep: {counts['running']} cell(s) still running elsewhere: "
              + "; ".join(counts["running_cells"]), file=sys.stderr)
        raise SystemExit(3)
    if counts["done"] < counts["total"]:
        print(f"istr sweep: {counts['done']}/{counts['total']} cells done ({counts['failed']} failed, "
              f"{counts['stale']} stale, {counts['pending']} pending); re-run the same command to retry",
              file=sys.stderr)
        raise SystemExit(1)


def status_command(args: argparse.Namespace) -> None:
    """``istr sweep-status STUDY [--storage URL]``."""
    from istr.sweep.records import sweep_status

    _print_status(sweep_status(args.study, args.storage, Path(args.root)))


def cancel_command(args: argparse.Namespace) -> None:
    """``istr sweep cancel STUDY [--storage URL]``: scancel the study's SLURM arrays; cells go back to the queue."""
    from istr.sweep.slurm import cancel_study

    jobs, said = cancel_study(args.study, args.storage, Path(args.root))
    if said:
        print(said, file=sys.stderr)
    print(f"cancelled SLURM job(s) {' '.join(jobs)} of sweep {args.study}: each worker hands its running cell back "
          "to the queue (resumed from its checkpoint by the next worker or `istr sweep`)")


def results_command(args: argparse.Namespace) -> None:
    """``istr sweep results STUDY [--storage URL]``: results.csv of every completed cell, from the storage."""
    from istr.sweep.records import sweep_results

    path = sweep_results(args.study, args.storage, Path(args.root))
    rows = len(path.read_text().splitlines()) - 1
    print(f"{path} ({rows} completed cell{'s' if rows != 1 else ''})")


def add_slurm_arguments(p: argparse.ArgumentParser) -> None:
    """``--launcher slurm`` and what a cluster asks of each worker (docs/sweeps.md#slurm)."""
    g = p.add_argument_group("SLURM (--launcher slurm)")
    g.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: --workers processes here; slurm: --workers array tasks of one SLURM job, each a "
                   "worker on the shared --storage (returns once submitted; 'istr sweep cancel STUDY' cancels)")
    g.add_argument("--wait", action="store_true", help="with --launcher slurm: wait for the array to end, then "
                   "print the status as istr sweep does")
    g.add_argument("--partition", default=None, help="sbatch --partition")
    g.add_argument("--account", default=None, help="sbatch --account")
    g.add_argument("--time", default=None, help="sbatch --time per worker (e.g. 4:00:00); 90 s before it the "
                   "worker checkpoints its cell and hands it back")
    g.add_argument("--gpus-per-worker", type=int, default=None, help="GPUs of each worker (sbatch --gres=gpu:N)")
    g.add_argument("--cpus-per-worker", type=int, default=None,
                   help="CPUs of each worker (sbatch --cpus-per-task; also each cell's train.num_threads)")
    g.add_argument("--sbatch-line", dest="sbatch_lines", action="append", default=[], metavar='"#SBATCH ..."',
                   help="an extra line for the batch script, e.g. '#SBATCH --qos=long' (repeatable)")
    g.add_argument("--allow-local-storage", action="store_true",
                   help="accept a --storage only this machine reaches (none, a journal file, a localhost "
                   "database): only for a one-node cluster, such as the one the tests start")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``sweep`` and ``sweep-status`` on the ``istr`` subparsers."""
    p = sub.add_parser("sweep", help="run/resume a sweep spec (sweeps/*.yaml) with Optuna; "
                       "'istr sweep status STUDY' shows its progress")
    p.add_argument("spec", help="sweeps/<axis>.yaml, an axis name, or 'status', 'results' or 'cancel' "
                   "(then a study name)")
    p.add_argument("study", nargs="?", default=None, help=argparse.SUPPRESS)
    add_common_arguments(p)
    p.add_argument("--name", default=None, help="study name (default <axis>-<preset>)")
    p.add_argument("--trials", type=int, default=None,
                   help="trial budget of a random/bayes spec (default: its run_cap); grids run every cell")
    p.add_argument("--archive", default=None, metavar="DIR",
                   help="cell archive: each finished cell's files but its weights are kept in DIR/<cell id>/, "
                   "and a cell found there is done (commit DIR to resume from git)")
    p.add_argument("--no-wait", action="store_true",
                   help="exit when this machine has nothing left to run, without waiting for the cells other "
                   "machines run (exit status 3 while some do)")
    p.add_argument("--array-task", action="store_true", help=argparse.SUPPRESS)  # one worker of a SLURM array
    add_slurm_arguments(p)
    p.set_defaults(func=sweep_command)

    p = sub.add_parser("sweep-status", help="cells done/running/failed/remaining of a study")
    p.add_argument("study")
    p.add_argument("--storage", default=None)
    p.add_argument("--root", default="runs/sweeps")
    p.set_defaults(func=status_command)
