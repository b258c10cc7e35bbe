"""Load sweep results (`runs/sweeps/<study>/results.csv`, columns in `istr.results`) into one DataFrame."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from istr.axes import preset_arm
from istr.io import claim_output_folder
from istr.results import COLUMNS, NUMERIC
from istr.spec_file import read_spec_file

STRING = [c for c in COLUMNS if c not in NUMERIC and c != "seed"]


class NoResultsError(FileNotFoundError):
    """No completed results rows were found where they were looked for."""


def normalize(df: pd.DataFrame) -> pd.DataFrame:
    """Coerce a results frame to the one schema: all columns present, metrics float (NaN = undefined)."""
    df = df.copy()
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = pd.NA
    for col in NUMERIC:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").astype("Int64")
    for col in STRING:
        df[col] = df[col].astype("string")
    return df[COLUMNS]


def load_results(runs: Path, studies: list[str] | None = None) -> pd.DataFrame:
    """Concatenate every `<runs>/<study>/results.csv` (only `studies` if given); keep rows with status == complete."""
    runs = Path(runs)
    if studies:
        files = [runs / s / "results.csv" for s in studies]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise NoResultsError(f"results.csv not found for requested studies: {', '.join(missing)}")
    else:
        files = sorted(runs.glob("*/results.csv"))
    if not files:
        raise NoResultsError(f"no results.csv files under {runs} (expected {runs}/<study>/results.csv)")
    frames = [pd.read_csv(f, dtype={"arm": str, "axis": str, "study": str}, keep_default_na=True) for f in files]
    df = normalize(pd.concat(frames, ignore_index=True))
    df = df[df["status"] == "complete"].reset_index(drop=True)
    if df.empty:
        raise NoResultsError(f"no rows with status == complete in {', '.join(str(f) for f in files)}")
    return df


def load_wandb(
    entity: str,
    project: str,
    axis_keys: Mapping[str, list[str]],
    defaults: Mapping[str, str],
    studies: list[str] | None = None,
) -> pd.DataFrame:
    """The same frame from the W&B API (online): finished runs of `entity/project`, groups = studies."""
    import wandb

    from analysis.wandb_rows import wandb_rows

    filters = {"group": {"$in": studies}} if studies else {}
    runs = wandb.Api().runs(f"{entity}/{project}", filters=filters)
    df = normalize(pd.DataFrame(wandb_rows(runs, axis_keys, defaults)))
    df = df[df["status"] == "complete"].reset_index(drop=True)
    if df.empty:
        raise NoResultsError(f"no finished runs in W&B project {entity}/{project} (groups: {studies or 'all'})")
    return df


def load_codec_report(path: Path | None) -> pd.DataFrame | None:
    """`istr codec-report`'s codec_report.csv (type, dim, mask_iou, oracle_segm_AP, ...), or None if absent."""
    if path is None or not Path(path).is_file():
        return None
    return pd.read_csv(path)


def read_axes(
    sweeps: Path, preset: Path | None = None, sets: Sequence[str] = ()
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({axis: swept config keys}, {axis: default arm}) of every `<sweeps>/<axis>.yaml`.

    Each spec is read by `istr.spec_file.read_spec_file`, the sweep harness's own reader (axis = the file stem,
    keys = its non-seed parameters; a bad spec is a ValueError naming the file). The default arm is the base
    preset's own value of those keys, read with `istr.config.load_config(preset, sets)`: `preset`, else the spec's
    `--config` argument (relative to the cwd, then to the folder above `sweeps`), named by `istr.axes.preset_arm`.
    """
    from istr.config import load_config

    keys: dict[str, list[str]] = {}
    defaults: dict[str, str] = {}
    for path in sorted(Path(sweeps).glob("*.yaml")):
        spec = read_spec_file(path)
        keys[spec.axis] = spec.axis_keys()
        base = Path(preset) if preset else Path(spec.preset)
        if not base.is_file() and not base.is_absolute():
            base = Path(sweeps).resolve().parent / base
        defaults[spec.axis] = preset_arm(load_config(base, list(sets)), keys[spec.axis])
    return keys, defaults


def read_seed_rule(path: Path | None) -> dict[str, Any] | None:
    """The `seed_rule.json` that `istr ablate` writes (the rule declared before the run, the n reached), or None."""
    if path is None:
        return None
    try:
        rule = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable seed_rule.json ({err})") from err
    if not isinstance(rule, dict) or not isinstance(rule.get("rule"), str):
        raise ValueError(f"{path}: a seed rule needs a 'rule' text")
    return rule


def results_from_cli(
    prog: str, description: str, default_out: Path, argv: list[str] | None
) -> tuple[argparse.Namespace, pd.DataFrame | None]:
    """Shared CLI of the analysis tools (``--runs/--studies/--out``, ``--codec-report``, ``--source wandb``);
    the frame is None (after an error message) when no results are found."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--runs", type=Path, default=Path("runs/sweeps"), help="folder holding <study>/results.csv")
    ap.add_argument("--studies", default=None, help="comma-separated study names (default: all)")
    ap.add_argument("--out", type=Path, default=default_out, help="output folder")
    ap.add_argument(
        "--codec-report",
        type=Path,
        default=None,
        help="codec_report.csv of `istr codec-report` (the codec upper-bound table and IoU-vs-dim plot)",
    )
    ap.add_argument(
        "--source",
        choices=("local", "wandb"),
        default="local",
        help="local results.csv files (default) or the W&B API (online; needs --entity/--project)",
    )
    ap.add_argument("--entity", default=None, help="W&B entity (with --source wandb)")
    ap.add_argument("--project", default=None, help="W&B project (with --source wandb)")
    ap.add_argument("--sweeps", type=Path, default=Path("sweeps"), help="folder of the axis specs (<axis>.yaml)")
    ap.add_argument(
        "--preset",
        type=Path,
        default=None,
        help="base preset YAML whose values are the default arms (default: each spec's --config)",
    )
    ap.add_argument(
        "--seed-rule",
        type=Path,
        default=None,
        help="seed_rule.json of `istr ablate` (the seed rule and n reached, stated in the footnote)",
    )
    args = ap.parse_args(argv)
    studies = [s for s in args.studies.split(",") if s] if args.studies else None
    if args.source == "wandb" and not (args.entity and args.project):
        ap.error("--source wandb needs --entity and --project")
    try:
        args.axis_keys, args.defaults = read_axes(args.sweeps, args.preset)
        args.seed_rule = read_seed_rule(args.seed_rule)
        claim_output_folder(args.out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return args, None
    try:
        if args.source == "wandb":
            return args, load_wandb(args.entity, args.project, args.axis_keys, args.defaults, studies)
        return args, load_results(args.runs, studies)
    except NoResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return args, None
