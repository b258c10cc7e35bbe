"""``istr ablate``: the ablation axes as one job (the default arm, shared by all, is trained once), then the
tables and figures.

Seeds: ``--seeds N`` runs seeds 0..N-1 for every arm. ``--seeds auto --budget-hours H --delta D`` runs a pilot of
``PILOT_SEEDS`` seeds for every arm; per axis, the pilot's largest SD of paired differences vs the default arm gives
the n at which a two-sided paired t-test detects D AP with power 0.8 (``analysis.stats.needed_n``); every arm of the
axis is then run to that n, capped so the job fits H hours at the pilot's measured cost per cell. The rule is
declared before the pilot (printed and written to ``<out>/seed_rule.json``) and never looks at a p-value: p-values
are read once, at the end, to say which arms could not be separated.

Every finished cell is kept in ``<out>/cells/`` (:mod:`istr.sweep.archive`, no weights), and the tables are built
from there: commit ``<out>`` and the same command on a fresh clone trains no archived cell, and an axis whose
cells are all archived runs no sweep at all, so the tables come back in seconds.

A command (docs/architecture.md#layers): it may use the sweep harness, the analysis package and the
reports, none of which import each other.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.stats import ALPHA, POWER, default_arm, mde, needed_n, paired_vs_default
from istr.axes import AXIS_NAMES, preset_arm
from istr.config import ConfigError, load_config
from istr.io import atomic_write_json, claim_output_folder

AXES = AXIS_NAMES  # the paper's axes, in its order: one list, istr/axes.py
PILOT_SEEDS = 3
RULE_FILE = "seed_rule.json"
ARCHIVE_DIR = "cells"  # <out>/cells/<cell id>/: the cell archive


@dataclass
class SeedPlan:
    """Per axis: the n that detects Δ at the pilot's SD (`needed`) and the n to run (`target`: needed, capped by
    the budget, never below the pilot); the new cells that takes and their estimated wall seconds."""

    needed: dict[str, int]
    target: dict[str, int]
    new_cells: int
    est_s: float
    capped: bool


def new_cells(target: Mapping[str, int], arms: Mapping[str, int], have: int) -> int:
    """Cells to train to bring every axis from `have` seeds per arm to `target[axis]`.

    The default arm is the base preset itself in every axis, so one cell serves them all: it is counted once.
    """
    extra = {axis: max(0, n - have) for axis, n in target.items()}
    return max(extra.values(), default=0) + sum((arms[axis] - 1) * e for axis, e in extra.items())


def plan_seeds(
    pilot_sd: Mapping[str, float],
    arms: Mapping[str, int],
    delta: float,
    pilot_n: int,
    cost_per_cell_s: float,
    remaining_s: float,
    workers: int,
    alpha: float = ALPHA,
    power: float = POWER,
) -> SeedPlan:
    """The seed counts of ``--seeds auto`` (module docstring), from the pilot's SD of paired differences per axis.

    An axis whose pilot SD is undefined (fewer than 2 paired seeds) stays at the pilot. The budget caps every axis
    at the same n: the largest one whose new cells, at `cost_per_cell_s` each on `workers` parallel workers, fit
    in `remaining_s`.
    """
    needed = {
        axis: max(pilot_n, needed_n(delta, sd, alpha, power)) if math.isfinite(sd) else pilot_n
        for axis, sd in pilot_sd.items()
    }
    cap = max(needed.values(), default=pilot_n)
    while cap > pilot_n:
        trial = {axis: min(n, cap) for axis, n in needed.items()}
        if new_cells(trial, arms, pilot_n) * cost_per_cell_s / workers <= remaining_s:
            break
        cap -= 1
    target = {axis: min(n, cap) for axis, n in needed.items()}
    cells = new_cells(target, arms, pilot_n)
    return SeedPlan(needed, target, cells, cells * cost_per_cell_s / workers, target != needed)


def pilot_sd(df: pd.DataFrame, axis: str, base: str) -> float:
    """The largest SD of paired (same seed) segm AP differences vs `base` among the axis's other arms (NaN: none)."""
    paired = paired_vs_default(df[df["axis"] == axis], "segm_AP", base)
    sds = paired.loc[paired["arm"] != base, "sd_diff"].dropna()
    return float(sds.max()) if len(sds) else math.nan


def axis_defaults(axes: list[str], preset: Path, sets: list[str]) -> dict[str, str]:
    """{axis: default arm}: the preset's own value of each spec's axis keys, named as the harness names arms
    (:func:`istr.axes.preset_arm`, as the analysis names them)."""
    from istr.sweep.spec import load_spec

    cfg = load_config(preset, sets)
    return {axis: preset_arm(cfg, load_spec(axis).axis_keys()) for axis in axes}


def declare_rule(args: argparse.Namespace, axes: list[str]) -> dict[str, Any]:
    """The seed rule, fixed before anything runs."""
    never = "Seeds are never added by looking at p-values."
    if args.seeds != "auto":
        which = f"seeds 0..{args.seeds - 1} (--seeds {args.seeds})" if args.seeds else "each spec's own seed grid"
        return {"mode": "fixed", "rule": f"fixed: {which} for every arm, chosen before the run. {never}"}
    rule = (
        f"pilot of {PILOT_SEEDS} seeds (0..{PILOT_SEEDS - 1}) for every arm; then, per axis, every arm is run to the "
        f"smallest n at which a two-sided paired t-test at α = {ALPHA} detects Δ = {args.delta} AP with power "
        f"{POWER}, given the largest SD of paired differences vs the default arm in the pilot (never below "
        f"{PILOT_SEEDS}), capped so the job fits {args.budget_hours} h of wall time at the pilot's mean cost per "
        f"cell on {args.workers} worker(s). {never}"
    )
    return {"mode": "auto", "rule": rule, "axes": axes, "pilot_seeds": PILOT_SEEDS, "delta": args.delta,
            "alpha": ALPHA, "power": POWER, "budget_hours": args.budget_hours, "workers": args.workers}  # fmt: skip


@functools.cache
def _grid(axis: str, preset: Path, seeds: int | None, sets: tuple[str, ...]) -> dict:
    """One axis' cells by id, resolved once per run: the sweep's check and the tables read the same grid."""
    from istr.sweep.runner import grid_cells

    return grid_cells(axis, str(preset), seeds, sets)


def _run_axes(
    args: argparse.Namespace, preset: Path, seeds: Mapping[str, int | None], studies: Mapping[str, str], archive: Path
) -> dict[str, dict]:
    """Each axis' sweep, unless every cell is archived; returns its cell counts
    (:func:`istr.sweep.records.status_counts`) by axis."""
    from istr.sweep.archive import archived
    from istr.sweep.runner import run_sweep

    counts = {}
    for axis, n in seeds.items():
        cells = _grid(axis, preset, n, tuple(args.sets))
        if all(archived(archive, cell_id) for cell_id in cells):
            counts[axis] = {"study": studies[axis], "total": len(cells), "done": len(cells), "running": 0,
                            "failed": 0, "stale": 0, "pending": 0, "running_cells": [], "archived": True}  # fmt: skip
        else:
            warn_if_code_differs(archive)
            counts[axis] = run_sweep(axis, preset=str(preset), seeds=n, sets=args.sets, study_name=studies[axis],
                                     workers=args.workers, storage_url=args.storage, archive=archive,
                                     trial_timeout=args.trial_timeout, root=Path(args.root))  # fmt: skip
        print(json.dumps(counts[axis]))
    return counts


def warn_if_code_differs(archive: Path) -> None:
    """Say so before training when the archive's cells were trained by another commit than this checkout: the
    new cells would mix code versions in one table (its footnote lists them), so continue at that commit."""
    from istr.provenance import code_version
    from istr.results import SUMMARY_FILE

    here = code_version()["commit"]
    theirs = set()
    for summary in sorted(Path(archive).glob(f"*/{SUMMARY_FILE}")):
        try:
            theirs.add((json.loads(summary.read_text()).get("code_version") or {}).get("commit"))
        except (OSError, ValueError):
            continue
    theirs.discard(None)
    if here and theirs and theirs != {here}:
        print(f"istr ablate: the cells in {archive} were trained at {', '.join(c[:12] for c in sorted(theirs))}, "
              f"this checkout is {here[:12]}: new cells would mix code versions in the tables. To continue the "
              f"same run: git worktree add ../istr-run {min(theirs)[:12]}, and run this command there with the "
              "same --out", file=sys.stderr)


def archived_results(
    args: argparse.Namespace, preset: Path, seeds: Mapping[str, int | None], studies: Mapping[str, str], archive: Path
) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """The results frame of every axis' cells found in the archive (missing cells have no row), and each axis'
    arms as its grid has them (an arm with no finished cell yet has none in the frame)."""
    from analysis.load import NoResultsError, normalize
    from istr.sweep.records import archive_rows

    rows, arms = [], {}
    for axis, n in seeds.items():
        cells = _grid(axis, preset, n, tuple(args.sets))
        arms[axis] = list(dict.fromkeys(cell.arm for cell in cells.values()))
        rows += archive_rows(studies[axis], axis, preset.stem, cells, archive)
    if not rows:
        raise NoResultsError(f"no finished cell of {', '.join(seeds)} in {archive}")
    return normalize(pd.DataFrame(rows)), arms


def exit_if_any_unfinished(counts: Mapping[str, dict]) -> None:
    """After the tables: exit as ``istr sweep`` does (1: cells failed or left, 3: cells still running elsewhere)
    when any axis' final study is not complete, so a script never takes a partial table for a whole one."""
    from istr.sweep.cli import exit_if_unfinished

    unfinished = {axis: c for axis, c in counts.items() if c["done"] < c["total"]}
    if not unfinished:
        return
    print(f"istr ablate: the tables above miss cells of {', '.join(unfinished)}", file=sys.stderr)
    merged = {key: sum(c[key] for c in unfinished.values())
              for key in ("done", "total", "running", "failed", "stale", "pending")}  # fmt: skip
    merged["running_cells"] = [cell for c in unfinished.values() for cell in c.get("running_cells", [])]
    exit_if_unfinished(merged)


def _study(args: argparse.Namespace, preset: Path, axis: str) -> str:
    return f"{axis}-{args.name or preset.stem}"


def _auto_seeds(args, preset, axes, defaults, rule, rule_path, started: float, archive: Path
                ) -> tuple[dict[str, str], dict[str, int], dict]:
    """Pilot, plan (written to the rule file before any further seed runs), then every axis to its planned n;
    returns {axis: the study holding its final seeds}, {axis: its final n} and {axis: that study's cell counts}.

    An axis run past the pilot is a new study `<pilot study>-n<N>` with seeds 0..N-1, so the pilot study stays as
    declared; the pilot's cells are found finished and reused (same cell ids), not retrained.
    """
    studies = {axis: _study(args, preset, axis) for axis in axes}
    seeds = {axis: PILOT_SEEDS for axis in axes}
    counts = _run_axes(args, preset, seeds, studies, archive)
    df, _ = archived_results(args, preset, seeds, studies, archive)
    sds = {axis: pilot_sd(df, axis, default_arm(df, axis, defaults)[0]) for axis in axes}
    arms = {axis: int(df.loc[df["axis"] == axis, "arm"].nunique()) for axis in axes}
    cost = float(df.drop_duplicates("cell_id")["wall_s"].mean())
    budget_s = args.budget_hours * 3600
    plan = plan_seeds(sds, arms, args.delta, PILOT_SEEDS, cost, budget_s - (time.monotonic() - started), args.workers)
    rule["pilot"] = {"sd_paired_diff": sds, "arms": arms, "cost_per_cell_s": cost,
                     "elapsed_s": time.monotonic() - started}  # fmt: skip
    rule["plan"] = asdict(plan)
    atomic_write_json(rule_path, rule)
    print(f"seeds auto: pilot SD of paired differences {sds}, {cost:.0f} s a cell -> n needed {plan.needed}, "
          f"running to {plan.target} ({plan.new_cells} new cells, ~{plan.est_s / 3600:.2f} h"
          f"{', capped by the budget' if plan.capped else ''})")  # fmt: skip
    for axis, n in plan.target.items():
        # Re-fit each axis to the time left at the measured cost, so the job ends within its budget.
        left = budget_s - (time.monotonic() - started)
        fit = plan_seeds({axis: sds[axis]}, {axis: arms[axis]}, args.delta, PILOT_SEEDS, cost, left, args.workers)
        n = min(n, fit.target[axis])
        if n > PILOT_SEEDS:
            studies[axis], seeds[axis] = f"{studies[axis]}-n{n}", n
            counts.update(_run_axes(args, preset, {axis: n}, studies, archive))
    return studies, seeds, counts


def with_checkpoints(df: pd.DataFrame, root: Path) -> pd.DataFrame:
    """The rows with each cell's run dir under ``root`` where it still holds its weights (the archive has none):
    what the prediction overlays draw from."""
    from istr.results import CHECKPOINT_FILE

    def weights_dir(cell_id: str, run_dir: str) -> str:
        found = sorted(root.glob(f"*/{cell_id}/{CHECKPOINT_FILE}"))
        return found[0].parents[1].as_posix() if found else run_dir

    return df.assign(run_dir=[weights_dir(c, r) for c, r in zip(df["cell_id"], df["run_dir"])])


def n_reached(df: pd.DataFrame, axis: str, arms: list[str]) -> int:
    """The fewest seeds with a defined segm AP over the axis's arms (0 while an arm has none)."""
    sub = df[df["axis"] == axis]
    seeds = sub.dropna(subset=["segm_AP"]).groupby("arm")["seed"].nunique()
    return int(seeds.reindex(arms).fillna(0).min())


def print_separation(df: pd.DataFrame, axes: list[str], defaults: Mapping[str, str]) -> None:
    """Per arm, whether its paired test vs the default arm separated them at α (read once, after all runs)."""
    for axis in axes:
        base = default_arm(df, axis, defaults)[0]
        for row in paired_vs_default(df[df["axis"] == axis], "segm_AP", base).itertuples():
            if row.arm == base:
                continue
            size = mde(row.n_pairs, row.sd_diff)
            detail = f"Δ = {row.delta:+.1f} AP, p = {row.p:.3f}, n = {row.n_pairs} pairs, MDE = {size:.1f} AP"
            verdict = "separated" if row.p < ALPHA else "could not separate"  # NaN p (no test): not separated
            print(f"{axis}: {verdict} {row.arm} from {base} ({detail})")


def ablate_command(args: argparse.Namespace) -> None:
    """The axis sweeps (fixed or ``--seeds auto`` seeds, module docstring), then the tables and figures."""
    from analysis import plots, tables
    from analysis.load import load_codec_report
    from analysis.summary import write_summary
    from istr.axes import CODEC_AXES
    from istr.reports.codec import codec_upper_bounds
    from istr.reports.overlays import write_overlays
    from istr.sweep.spec import resolve_preset

    if (args.seeds == "auto") != (args.budget_hours is not None):
        raise ConfigError("--seeds auto needs --budget-hours H, and --budget-hours only applies to --seeds auto")
    if args.seeds == "auto" and not (args.delta > 0 and args.budget_hours > 0):
        raise ConfigError(f"--delta and --budget-hours must be > 0 (got {args.delta}, {args.budget_hours})")
    if args.tables_only and not isinstance(args.seeds, int):
        raise ConfigError("--tables-only needs the fixed --seeds N the cells were run with")
    started = time.monotonic()
    _grid.cache_clear()  # specs and presets may have changed since an earlier command in this process
    preset = resolve_preset(args.preset or "tiny")
    axes = [a for a in args.axes.split(",") if a]
    defaults = axis_defaults(axes, preset, args.sets)
    out = claim_output_folder(Path(args.out or f"results/{args.name or preset.stem}"))
    archive, root = out / ARCHIVE_DIR, Path(args.root)
    rule = declare_rule(args, axes)
    rule_path = out / RULE_FILE
    atomic_write_json(rule_path, rule)
    print(f"seed rule (declared before the run, {rule_path}): {rule['rule']}")
    counts: dict[str, dict] = {}
    if args.seeds == "auto":
        by_axis, seeds, counts = _auto_seeds(args, preset, axes, defaults, rule, rule_path, started, archive)
    else:
        by_axis, seeds = {axis: _study(args, preset, axis) for axis in axes}, {axis: args.seeds for axis in axes}
        if not args.tables_only:
            counts = _run_axes(args, preset, seeds, by_axis, archive)
    df, arms = archived_results(args, preset, seeds, by_axis, archive)
    rule["n_reached"] = {axis: n_reached(df, axis, arms[axis]) for axis in axes}
    atomic_write_json(rule_path, rule)
    report = load_codec_report(codec_upper_bounds(load_config(preset, args.sets), df, CODEC_AXES, out))
    written = tables.write_tables(df, out, report, defaults, rule, args.delta)
    print(tables.format_tables(written))
    write_summary(written, {axis: len(_grid(axis, preset, seeds[axis], tuple(args.sets))) for axis in axes}, out)
    plots.write_figures(df, out / "figures", report, defaults=defaults)
    write_overlays(with_checkpoints(df, root), out / "figures", defaults=defaults)
    print_separation(df, axes, defaults)
    print(f"results: tables in {out}/ (*.md, *.tex, *.csv; their short form in summary.md), figures in "
          f"{out / 'figures'}/, seed rule in {rule_path}")
    exit_if_any_unfinished(counts)


def _seeds(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--seeds takes a positive integer or 'auto', not {text!r}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``istr ablate`` (the sweep options of ``istr sweep``, and ``--seeds N|auto``)."""
    from istr.sweep.cli import add_common_arguments

    p = sub.add_parser("ablate", conflict_handler="resolve",
                       help=f"the ablation sweeps ({', '.join(AXES)}) as one job, then the tables and figures")
    add_common_arguments(p)
    p.add_argument("--seeds", type=_seeds, default=None,
                   help="seeds per arm: N (0..N-1) or 'auto' (a pilot of 3, then the n that detects --delta; "
                   "needs --budget-hours). Default: each spec's seed grid")  # fmt: skip
    p.add_argument("--budget-hours", type=float, default=None, help="wall-time budget of --seeds auto")
    p.add_argument("--delta", type=float, default=1.0,
                   help="mask AP difference --seeds auto sizes n to detect; the tables hold every arm's MDE to it")
    p.add_argument("--axes", default=",".join(AXES),
                   help=f"comma-separated subset of the axes (default: all, {','.join(AXES)})")  # fmt: skip
    p.add_argument("--name", default=None, help="study name suffix (default: the preset name)")
    p.add_argument("--tables-only", action="store_true",
                   help="train nothing: the tables and figures from the cells archived in <out>/cells/ so far")
    p.add_argument("--out", default=None,
                   help="folder for the cell archive (cells/), the tables, figures and seed_rule.json "
                   "(default: results/<--name or the preset's name>)")  # fmt: skip
    p.set_defaults(func=ablate_command)
