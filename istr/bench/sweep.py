"""`istr bench --sweep-overhead`: what the sweep harness costs per trial, beside the training it runs.

Runs a real grid sweep (``istr.sweep.runner.run_sweep``, one worker, journal storage) with a short
step budget in an empty root, then splits its wall time:

- **harness overhead** per trial = (sweep wall - sum of child walls) / trials: Optuna storage,
  enqueueing, leases, ``results.csv`` rewrites, ``load_config`` + cell hashing, spawning;
- **child startup + eval** = a trial's child wall (``wall_s`` in ``sweep_trial.json``, timed by the
  harness around ``istr train``) - its ``train_seconds`` (``train_summary.json``, the train loop):
  interpreter + imports, dataset/codec loading, model build, W&B (offline), final COCO eval;
- **resume**: the same command again (every cell complete: nothing runs), per cell;
- **reuse**: the same grid as a new study in the same root (every cell found done, nothing trained),
  per trial.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from istr.results import SUMMARY_FILE, TRAIN_LOG

DEFAULT_SETS = ("train.max_steps=20", "train.checkpoint_every=20")  # the harness adds logging.progress=false
STUDY = "overhead"


def _rows(root: Path, study: str) -> list[dict[str, str]]:
    with open(root / study / "results.csv") as handle:
        return list(csv.DictReader(handle))


def _log_sizes(root: Path) -> dict[str, int]:
    """Size of every cell's ``train.log`` under ``root`` (it grows only when a trial trains)."""
    return {p.as_posix(): p.stat().st_size for p in root.glob(f"*/*/{TRAIN_LOG}")}


def _trained(before: dict[str, int], after: dict[str, int]) -> int:
    """Cells that trained between two :func:`_log_sizes` snapshots (log grew or appeared)."""
    return sum(after.get(k) != v for k, v in before.items()) + len(after.keys() - before.keys())


def _timed_sweep(spec: str | Path, root: Path, study: str, **kw: Any) -> tuple[float, dict[str, Any]]:
    from istr.sweep.runner import run_sweep

    start = time.perf_counter()
    counts = run_sweep(
        spec, study_name=study, workers=1, storage_url=None, trial_timeout=None, root=root, progress=False, **kw
    )
    wall = time.perf_counter() - start
    if counts["failed"] or counts["done"] != counts["total"]:
        raise RuntimeError(f"sweep {study} under {root} did not complete: {counts} (see the cells' train.log)")
    return wall, counts


def _trial(row: dict[str, str]) -> dict[str, Any]:
    """One results row -> the harness's child wall and the child's own train loop time."""
    from istr.results import TRIAL_RECORD

    run_dir = Path(row["run_dir"])
    wall = float(json.loads((run_dir / TRIAL_RECORD).read_text())["wall_s"])
    train = float(json.loads((run_dir / SUMMARY_FILE).read_text())["train_seconds"])
    return {
        "cell_id": row["cell_id"],
        "arm": row["arm"],
        "seed": int(row["seed"]),
        "wall_s": wall,
        "train_s": train,
        "startup_eval_s": wall - train,
    }


def measure(spec: str | Path, preset: str, seeds: int, sets: Sequence[str], root: Path) -> dict[str, Any]:
    """Sweep, resume and reuse in ``root`` (must hold no studies: cells would be reused) -> JSON dict."""
    if root.is_dir() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; the overhead run needs an empty --root (or none: a temp dir)")
    os.environ.setdefault("WANDB_MODE", "offline")
    kw = {"preset": preset, "seeds": seeds, "sets": list(sets)}
    wall, counts = _timed_sweep(spec, root, STUDY, **kw)
    trials = [_trial(row) for row in _rows(root, STUDY)]
    n = len(trials)
    child = sum(t["wall_s"] for t in trials)
    overhead = (wall - child) / n
    mean_wall = child / n
    logs = _log_sizes(root)
    resume_wall, _ = _timed_sweep(spec, root, STUDY, **kw)
    resumed_logs = _log_sizes(root)
    reuse_wall, _ = _timed_sweep(spec, root, f"{STUDY}-reuse", **kw)
    reuse_rows = _rows(root, f"{STUDY}-reuse")
    return {
        "config": {
            "spec": str(spec),
            "axis": counts["axis"],
            "preset": preset,
            "seeds": seeds,
            "sets": list(sets),
            "root": root.as_posix(),
            "study": STUDY,
            "wandb_mode": os.environ["WANDB_MODE"],
            "cpu_count": os.cpu_count(),
        },
        "sweep": {"wall_s": wall, "n_trials": n, "child_wall_s_sum": child},
        "trials": trials,
        "per_trial": {
            "harness_overhead_s": overhead,
            "child_wall_s": mean_wall,
            "train_s": statistics.fmean(t["train_s"] for t in trials),
            "startup_eval_s": statistics.fmean(t["startup_eval_s"] for t in trials),
            "harness_overhead_pct": 100 * overhead / mean_wall,
        },
        "resume": {"wall_s": resume_wall, "per_cell_s": resume_wall / n, "trained": _trained(logs, resumed_logs)},
        "reuse": {
            "wall_s": reuse_wall,
            "n_trials": len(reuse_rows),
            "per_trial_s": reuse_wall / len(reuse_rows),
            "reused": sum(bool(r["reused_from"]) for r in reuse_rows),
            "trained": _trained(resumed_logs, _log_sizes(root)),
        },
    }


def run_sweep_overhead(
    spec: str | Path = "attention",
    preset: str = "tiny",
    seeds: int = 1,
    sets: Sequence[str] = DEFAULT_SETS,
    root: str | Path | None = None,
    json_path: str | Path | None = None,
) -> dict[str, Any]:
    """Measure the harness overhead per trial (in a temp root unless ``root``); write ``json_path``."""
    from istr.io import atomic_write_json

    if root is None:
        with tempfile.TemporaryDirectory(prefix="istr-sweep-overhead-") as tmp:
            result = measure(spec, preset, seeds, sets, Path(tmp))
    else:
        result = measure(spec, preset, seeds, sets, Path(root))
    if json_path:
        atomic_write_json(Path(json_path), result)
    return result


def format_table(result: dict[str, Any]) -> str:
    c, s, p = result["config"], result["sweep"], result["per_trial"]
    lines = [
        f"istr bench --sweep-overhead: axis {c['axis']}, preset {c['preset']}, {s['n_trials']} trials "
        f"(1 worker, journal storage), --set {' '.join(c['sets'])}",
        f"{'cell':14}{'arm':>16}{'seed':>6}{'child wall s':>14}{'train s':>10}{'startup+eval s':>16}",
    ]
    for t in result["trials"]:
        lines.append(
            f"{t['cell_id'][:12]:14}{t['arm']:>16}{t['seed']:>6}{t['wall_s']:>14.2f}{t['train_s']:>10.2f}"
            f"{t['startup_eval_s']:>16.2f}"
        )
    r, u = result["resume"], result["reuse"]
    lines += [
        f"sweep wall {s['wall_s']:.2f} s = children {s['child_wall_s_sum']:.2f} s + harness "
        f"{s['wall_s'] - s['child_wall_s_sum']:.2f} s",
        f"per trial: harness overhead {p['harness_overhead_s']:.2f} s ({p['harness_overhead_pct']:.1f} % of the "
        f"mean child wall {p['child_wall_s']:.2f} s); child startup+eval {p['startup_eval_s']:.2f} s, "
        f"train {p['train_s']:.2f} s",
        f"resume (same study, all done): {r['wall_s']:.2f} s = {r['per_cell_s']:.3f} s per cell, "
        f"trained {r['trained']}",
        f"reuse (new study, {u['reused']}/{u['n_trials']} cells reused): {u['wall_s']:.2f} s = "
        f"{u['per_trial_s']:.3f} s per trial, trained {u['trained']}",
    ]
    return "\n".join(lines)


def add_sweep_overhead_arguments(parser: argparse.ArgumentParser) -> None:
    """``istr bench --sweep-overhead`` and its options, on the ``istr bench`` parser."""
    g = parser.add_argument_group("sweep harness overhead (istr/bench/sweep.py)")
    g.add_argument(
        "--sweep-overhead",
        action="store_true",
        help="instead of the model bench: time a real tiny sweep, split into harness and child time",
    )
    g.add_argument("--spec", default="attention", help="sweep spec: sweeps/<axis>.yaml or an axis name")
    g.add_argument("--preset", default=None,
                   help="experiments/<NAME>.yaml or a YAML path (default tiny); without --sweep-overhead: "
                        "time that preset's train step, plain fp32 vs the fast path (istr/bench/cell.py)")
    g.add_argument("--seeds", type=int, default=1, help="seeds per arm (cells = arms x seeds)")
    g.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra override for every trial, after train.max_steps=20 train.checkpoint_every=20",
    )
    g.add_argument("--root", default=None, help="empty folder for the studies, kept (default: a temp dir)")


def sweep_overhead_command(args: argparse.Namespace) -> None:
    """``istr bench --sweep-overhead``: run, print the table (and write ``--json``)."""
    result = run_sweep_overhead(args.spec, args.preset or "tiny", args.seeds, [*DEFAULT_SETS, *args.sets], args.root,
                                args.json)
    print(format_table(result))
