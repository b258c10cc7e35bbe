"""Load sweep results (`runs/sweeps/<study>/results.csv`) into one DataFrame (DESIGN.md, "Sweep results row")."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

METRICS = [f"{kind}_{m}" for kind in ("segm", "bbox") for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
COLUMNS = [
    "study", "axis", "arm", "cell_id", "seed", "preset", "status", *METRICS,
    "steps", "wall_s", "img_per_s", "device", "run_dir", "wandb_run_id", "finished_at",
]  # fmt: skip
NUMERIC = [*METRICS, "steps", "wall_s", "img_per_s"]
STRING = ["study", "axis", "arm", "cell_id", "preset", "status", "device", "run_dir", "wandb_run_id", "finished_at"]


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


def results_from_cli(
    prog: str, description: str, default_out: Path, argv: list[str] | None
) -> tuple[argparse.Namespace, pd.DataFrame | None]:
    """Shared ``--runs/--studies/--out`` CLI of the analysis tools; the frame is None (after an error
    message) when no results are found."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--runs", type=Path, default=Path("runs/sweeps"), help="folder holding <study>/results.csv")
    ap.add_argument("--studies", default=None, help="comma-separated study names (default: all)")
    ap.add_argument("--out", type=Path, default=default_out, help="output folder")
    args = ap.parse_args(argv)
    studies = [s for s in args.studies.split(",") if s] if args.studies else None
    try:
        return args, load_results(args.runs, studies)
    except NoResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return args, None
