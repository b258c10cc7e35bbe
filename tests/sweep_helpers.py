"""Helpers shared by the sweep tests: a tiny preset + grid spec, and readers of what a sweep wrote."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import yaml

from istr.config import to_yaml
from tests.conftest import REPO


def write_setup(tmp_path: Path, cfg_factory, values: list[str], *extra: str) -> tuple[Path, Path]:
    """A base preset (the tiny test config) and a loss-axis grid spec over ``values``."""
    preset = tmp_path / "base.yaml"
    preset.write_text(to_yaml(cfg_factory("train.max_steps=2", "train.num_threads=1", *extra)))
    spec = tmp_path / "loss.yaml"
    raw = yaml.safe_load((REPO / "sweeps" / "loss.yaml").read_text())
    raw["parameters"]["loss.mask"]["values"] = list(values)  # in place of the arms sweeps/loss.yaml lists
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    return preset, spec


def read_rows(root: Path, study: str) -> list[dict]:
    with open(root / study / "results.csv") as handle:
        return list(csv.DictReader(handle))


def metrics_lines(run_dirs: list[Path]) -> dict[str, int]:
    return {d.name: len((d / "metrics.jsonl").read_text().splitlines()) for d in run_dirs}


def cell_dirs(root: Path, study: str) -> list[Path]:
    return sorted(p for p in (root / study).iterdir() if p.is_dir() and (p / "config.yaml").exists())


def wandb_run(offline: Path) -> tuple[dict, list[dict]]:
    """An offline W&B run read by W&B's own reader (``wandb leet inspect --json``): summary info, history rows."""
    cli = [sys.executable, "-m", "wandb", "leet", "inspect"]
    info = json.loads(subprocess.run([*cli, "--summary", "--json", str(offline)], check=True, capture_output=True,
                                     text=True).stdout)
    records = subprocess.run([*cli, "--json", str(offline)], check=True, capture_output=True, text=True).stdout
    history = [json.loads(line)["history"]["item"] for line in records.splitlines() if '"type":"history"' in line]
    return info, history
