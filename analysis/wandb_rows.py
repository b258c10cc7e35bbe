"""W&B runs -> results rows (the schema of `analysis.load`), so W&B and local results.csv share one loader.

A sweep trial is a W&B run with group = study, job_type = axis, config = the resolved config and the
eval metrics (`segm_AP`, ...) in its summary (`istr.engine.sinks`, `istr.sweep.trial`). A cell that a
later study reuses (the default arm, trained once) is logged once, under the study that trained it; as
the harness does, a run whose arm is its own axis's default arm is also a row of every other axis found.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from istr.results import METRICS, arm_name


def _unwrap(config: dict[str, Any]) -> dict[str, Any]:
    """Top-level `{"value": v, "desc": ...}` entries (the W&B storage format) -> `v`; drop `_wandb`."""
    out = {}
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict) and "value" in value and set(value) <= {"value", "desc"}:
            value = value["value"]
        out[key] = value
    return out


def select(config: dict[str, Any], dotted: str) -> Any:
    """`config["codec"]["type"]` for `"codec.type"`; None when a level is missing."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def run_row(run: Any, axis: str, keys: list[str]) -> dict[str, Any]:
    """One results row of `run` (a `wandb.apis.public.Run` or anything with its attributes) as a row of `axis`."""
    config, summary = _unwrap(dict(run.config)), dict(run.summary)
    return {
        "study": run.group,
        "axis": axis,
        "arm": arm_name({key: select(config, key) for key in keys}),
        "cell_id": f"wandb:{run.id}",
        "seed": config.get("seed"),
        "status": "complete" if run.state == "finished" else str(run.state),
        **{metric: summary.get(metric) for metric in METRICS},
        "steps": summary.get("steps"),
        "wall_s": summary.get("_runtime"),
        "img_per_s": summary.get("img_per_s"),
        "wandb_run_id": run.id,
        "codec_type": select(config, "codec.type"),
        "codec_dim": select(config, "codec.dim"),
    }


def wandb_rows(
    runs: Iterable[Any], axis_keys: Mapping[str, list[str]], defaults: Mapping[str, str]
) -> list[dict[str, Any]]:
    """Rows of every sweep-trial run, the default-arm runs shared with the other axes (module docstring).

    `axis_keys` and `defaults` are `analysis.load.read_axes`'s: a run whose job type is not an axis there is skipped.
    """
    runs = list(runs)
    keys = {axis: axis_keys.get(axis) for axis in {run.job_type for run in runs}}
    own = [(run, run_row(run, run.job_type, keys[run.job_type])) for run in runs if keys[run.job_type]]
    rows = [row for _, row in own]
    present = {(row["axis"], row["arm"], row["seed"]) for row in rows}
    for run, row in own:
        if row["arm"] != defaults.get(row["axis"]):
            continue
        for axis, axis_keys in keys.items():
            if axis == row["axis"] or not axis_keys:
                continue
            shared = run_row(run, axis, axis_keys)
            if shared["arm"] == defaults.get(axis) and (axis, shared["arm"], shared["seed"]) not in present:
                rows.append(shared)
                present.add((axis, shared["arm"], shared["seed"]))
    return rows
