"""``istr sweep`` / ``istr sweep-status``: argparse wiring for the sweep harness (``istr ablate``: istr/ablate.py).

Wire into ``istr/cli.py``'s ``build_parser`` with::

    from istr.sweep.cli import add_parsers
    add_parsers(sub)

``istr sweep status STUDY`` also works (SPEC == "status" is dispatched to the status handler),
as does the separate ``istr sweep-status STUDY``; ``istr sweep results STUDY`` rewrites the study's
``results.csv`` from the storage.
"""

from __future__ import annotations

import argparse
import json
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

    if args.spec in ("status", "results"):
        if not args.study:
            raise FileNotFoundError(f"usage: istr sweep {args.spec} STUDY [--storage URL] [--root DIR]")
        command = status_command if args.spec == "status" else results_command
        return command(argparse.Namespace(study=args.study, storage=args.storage, root=args.root))
    if args.study:
        from istr.sweep.spec import SpecError

        raise SpecError(f"unexpected argument {args.study!r} after the spec (did you mean --name?)")
    archive = None
    if args.archive:
        from istr.io import claim_output_folder

        archive = claim_output_folder(Path(args.archive), option="--archive")
    counts = run_sweep(args.spec, preset=args.preset, seeds=args.seeds, sets=args.sets, study_name=args.name,
                       workers=args.workers, storage_url=args.storage, trial_timeout=args.trial_timeout,
                       root=Path(args.root), trials=args.trials, wait=not args.no_wait,
                       archive=archive)
    _print_status(counts)
    exit_if_unfinished(counts)


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


def results_command(args: argparse.Namespace) -> None:
    """``istr sweep results STUDY [--storage URL]``: results.csv of every completed cell, from the storage."""
    from istr.sweep.records import sweep_results

    path = sweep_results(args.study, args.storage, Path(args.root))
    rows = len(path.read_text().splitlines()) - 1
    print(f"{path} ({rows} completed cell{'s' if rows != 1 else ''})")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``sweep`` and ``sweep-status`` on the ``istr`` subparsers."""
    p = sub.add_parser("sweep", help="run/resume a sweep spec (sweeps/*.yaml) with Optuna; "
                       "'istr sweep status STUDY' shows its progress")
    p.add_argument("spec", help="sweeps/<axis>.yaml, an axis name, 'status' or 'results' (then a study name)")
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
    p.set_defaults(func=sweep_command)

    p = sub.add_parser("sweep-status", help="cells done/running/failed/remaining of a study")
    p.add_argument("study")
    p.add_argument("--storage", default=None)
    p.add_argument("--root", default="runs/sweeps")
    p.set_defaults(func=status_command)
