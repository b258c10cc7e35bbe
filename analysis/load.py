"""Load sweep results (`runs/sweeps/<study>/results.csv`, columns in `istr.results`) into one DataFrame."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from istr.results import COLUMNS, NUMERIC

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
    entity: str, project: str, axis_keys: Mapping[str, Sequence[str]], studies: list[str] | None = None
) -> pd.DataFrame:
    """The same frame from the W&B API (online): finished runs of `entity/project`, groups = studies.

    `axis_keys` names each axis' swept config keys (the sweep specs' parameters), which turn a run's
    config into its arm."""
    import wandb

    from analysis.wandb_rows import wandb_rows

    filters = {"group": {"$in": studies}} if studies else {}
    df = normalize(pd.DataFrame(wandb_rows(wandb.Api().runs(f"{entity}/{project}", filters=filters), axis_keys)))
    df = df[df["status"] == "complete"].reset_index(drop=True)
    if df.empty:
        raise NoResultsError(f"no finished runs in W&B project {entity}/{project} (groups: {studies or 'all'})")
    return df


def load_codec_report(path: Path | None) -> pd.DataFrame | None:
    """`istr codec-report`'s codec_report.csv (type, dim, mask_iou, oracle_segm_AP, ...), or None if absent."""
    if path is None or not Path(path).is_file():
        return None
    return pd.read_csv(path)


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
    ap.add_argument(
        "--axis-keys",
        action="append",
        default=[],
        metavar="AXIS=KEY[,KEY]",
        help="with --source wandb, repeatable: an axis and its swept config keys, e.g. attention=model.attention",
    )
    args = ap.parse_args(argv)
    studies = [s for s in args.studies.split(",") if s] if args.studies else None
    if args.source == "wandb" and not (args.entity and args.project and args.axis_keys):
        ap.error("--source wandb needs --entity, --project and --axis-keys")
    axis_keys = {}
    for item in args.axis_keys:
        axis, _, keys = item.partition("=")
        if not (axis and keys):
            ap.error(f"--axis-keys {item!r}: expected AXIS=KEY[,KEY], e.g. attention=model.attention")
        axis_keys[axis] = keys.split(",")
    try:
        if args.source == "wandb":
            return args, load_wandb(args.entity, args.project, axis_keys, studies)
        return args, load_results(args.runs, studies)
    except NoResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return args, None
