"""``istr sweep`` / ``istr sweep-status`` / ``istr ablate``: argparse wiring for the sweep harness.

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

AXES = ("embedding", "embedding_dim", "mask_cost", "loss", "attention")


def _common(p: argparse.ArgumentParser) -> None:
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
    counts = run_sweep(args.spec, preset=args.preset, seeds=args.seeds, sets=args.sets, study_name=args.name,
                       workers=args.workers, storage_url=args.storage, trial_timeout=args.trial_timeout,
                       root=Path(args.root), trials=args.trials, wait=not args.no_wait)
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


def codec_upper_bounds(preset: Path, sets: list[str], root: Path, studies: list[str], out: Path) -> Path | None:
    """``istr codec-report`` for every codec the embedding studies trained -> ``out/codec_report.csv``.

    The reconstruction upper bound of the paper's mask-embedding table (ISTR_SPEC §7.1); None when the
    studies hold no codec arm. Codecs come from the fit cache the trials filled, so this only evaluates.
    """
    from analysis.load import NoResultsError, load_results
    from analysis.tables import CODEC_AXES
    from istr.codecs.report import codec_report_pairs
    from istr.config import load_config

    try:
        df = load_results(root, studies)
    except NoResultsError:
        return None
    codecs = df[df["axis"].isin(CODEC_AXES)].dropna(subset=["codec_type", "codec_dim"])
    pairs = sorted({(str(t), int(d)) for t, d in zip(codecs["codec_type"], codecs["codec_dim"])})
    if not pairs:
        return None
    codec_report_pairs(load_config(preset, sets), pairs, out)
    return out / "codec_report.csv"


def ablate_command(args: argparse.Namespace) -> list[dict]:
    """The axis sweeps as one job (the default arm, shared by all, is trained once), then the analysis."""
    from analysis import plots, tables
    from istr.sweep.runner import run_sweep
    from istr.sweep.spec import resolve_preset

    preset = resolve_preset(args.preset or "tiny")
    results, studies = [], []
    for axis in args.axes.split(","):
        study = f"{axis}-{args.name or preset.stem}"
        counts = run_sweep(axis, preset=str(preset), seeds=args.seeds, sets=args.sets,
                           study_name=study, workers=args.workers,
                           storage_url=args.storage, trial_timeout=args.trial_timeout, root=Path(args.root))
        results.append(counts)
        studies.append(study)
        print(json.dumps(counts))
    # Then the paper's tables and figures from the studies just run (analysis/, issue 6).
    selection = ["--runs", args.root, "--studies", ",".join(studies)]
    report = codec_upper_bounds(preset, args.sets, Path(args.root), studies, Path(args.out))
    if report is not None:
        selection += ["--codec-report", str(report)]
    tables.main([*selection, "--out", args.out])
    plots.main([*selection, "--out", str(Path(args.out) / "figures")])
    print(f"results: tables in {args.out}/ (*.md, *.tex, *.csv), figures in {Path(args.out) / 'figures'}/")
    return results


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``sweep``, ``sweep-status`` and ``ablate`` on the ``istr`` subparsers."""
    p = sub.add_parser("sweep", help="run/resume a sweep spec (sweeps/*.yaml) with Optuna; "
                       "'istr sweep status STUDY' shows its progress")
    p.add_argument("spec", help="sweeps/<axis>.yaml, an axis name, 'status' or 'results' (then a study name)")
    p.add_argument("study", nargs="?", default=None, help=argparse.SUPPRESS)
    _common(p)
    p.add_argument("--name", default=None, help="study name (default <axis>-<preset>)")
    p.add_argument("--trials", type=int, default=None,
                   help="trial budget of a random/bayes spec (default: its run_cap); grids run every cell")
    p.add_argument("--no-wait", action="store_true",
                   help="exit when this machine has nothing left to run, without waiting for the cells other "
                   "machines run (exit status 3 while some do)")
    p.set_defaults(func=sweep_command)

    p = sub.add_parser("sweep-status", help="cells done/running/failed/remaining of a study")
    p.add_argument("study")
    p.add_argument("--storage", default=None)
    p.add_argument("--root", default="runs/sweeps")
    p.set_defaults(func=status_command)

    p = sub.add_parser("ablate", help="the ablation sweeps (embedding, embedding_dim, mask_cost, loss, "
                       "attention) as one job, then the tables and figures")
    _common(p)
    p.add_argument("--axes", default=",".join(AXES), help="comma-separated subset of the axes")
    p.add_argument("--name", default=None, help="study name suffix (default: the preset name)")
    p.add_argument("--out", default="results", help="folder for the tables and figures")
    p.set_defaults(func=ablate_command)
