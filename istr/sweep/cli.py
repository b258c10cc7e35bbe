"""``istr sweep`` / ``istr sweep-status``: argparse wiring for the sweep harness (``istr ablate``: istr/ablate.py).

Wire into ``istr/cli.py``'s ``build_parser`` with::

    from istr.sweep.cli import add_parsers
    add_parsers(sub)

``istr sweep status STUDY`` also works (SPEC == "status" is dispatched to the status handler),
as does the separate ``istr sweep-status STUDY``.
"""

from __future__ import annotations

import argparse
import json
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

    if args.spec == "status":
        if not args.study:
            raise FileNotFoundError("usage: istr sweep status STUDY [--storage URL]")
        return status_command(argparse.Namespace(study=args.study, storage=args.storage, root=args.root))
    if args.study:
        from istr.sweep.spec import SpecError

        raise SpecError(f"unexpected argument {args.study!r} after the spec (did you mean --name?)")
    counts = run_sweep(args.spec, preset=args.preset, seeds=args.seeds, sets=args.sets, study_name=args.name,
                       workers=args.workers, storage_url=args.storage, trial_timeout=args.trial_timeout,
                       root=Path(args.root), trials=args.trials)
    _print_status(counts)


def status_command(args: argparse.Namespace) -> None:
    """``istr sweep-status STUDY [--storage URL]``."""
    from istr.sweep.records import sweep_status

    _print_status(sweep_status(args.study, args.storage, Path(args.root)))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``sweep`` and ``sweep-status`` on the ``istr`` subparsers."""
    p = sub.add_parser("sweep", help="run/resume a sweep spec (sweeps/*.yaml) with Optuna; "
                       "'istr sweep status STUDY' shows its progress")
    p.add_argument("spec", help="sweeps/<axis>.yaml, an axis name, or 'status'")
    p.add_argument("study", nargs="?", default=None, help=argparse.SUPPRESS)
    add_common_arguments(p)
    p.add_argument("--name", default=None, help="study name (default <axis>-<preset>)")
    p.add_argument("--trials", type=int, default=None,
                   help="trial budget of a random/bayes spec (default: its run_cap); grids run every cell")
    p.set_defaults(func=sweep_command)

    p = sub.add_parser("sweep-status", help="cells done/running/failed/remaining of a study")
    p.add_argument("study")
    p.add_argument("--storage", default=None)
    p.add_argument("--root", default="runs/sweeps")
    p.set_defaults(func=status_command)
