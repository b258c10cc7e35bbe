"""``istr ablate``: the axis sweeps as one job, then the tables, figures, codec bounds and overlays.

A command (docs/architecture.md#layers): it may use the sweep harness, the analysis package and the
reports, none of which import each other.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

AXES = ("embedding", "embedding_dim", "mask_cost", "loss", "attention")


def ablate_command(args: argparse.Namespace) -> list[dict]:
    """The axis sweeps as one job (the default arm, shared by all, is trained once), then the analysis."""
    from analysis import plots, tables
    from analysis.load import NoResultsError, load_results
    from analysis.tables import CODEC_AXES
    from istr.config import load_config
    from istr.reports.codec import codec_upper_bounds
    from istr.reports.overlays import write_overlays
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
    try:
        df = load_results(Path(args.root), studies)
    except NoResultsError as err:
        print(f"no tables: {err}")
        return results
    out, figures = Path(args.out), Path(args.out) / "figures"
    selection = ["--runs", args.root, "--studies", ",".join(studies)]
    report = codec_upper_bounds(load_config(preset, args.sets), df, CODEC_AXES, out)
    if report is not None:
        selection += ["--codec-report", str(report)]
    tables.main([*selection, "--out", str(out)])
    plots.main([*selection, "--out", str(figures)])
    write_overlays(df, figures)
    print(f"results: tables in {out}/ (*.md, *.tex, *.csv), figures in {figures}/")
    return results


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``ablate`` on the ``istr`` subparsers."""
    from istr.sweep.cli import add_common_arguments

    p = sub.add_parser("ablate", help="the ablation sweeps (embedding, embedding_dim, mask_cost, loss, "
                       "attention) as one job, then the tables and figures")
    add_common_arguments(p)
    p.add_argument("--axes", default=",".join(AXES), help="comma-separated subset of the axes")
    p.add_argument("--name", default=None, help="study name suffix (default: the preset name)")
    p.add_argument("--out", default="results", help="folder for the tables and figures")
    p.set_defaults(func=ablate_command)
