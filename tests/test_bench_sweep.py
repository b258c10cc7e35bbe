"""`istr bench --sweep-overhead`: a real 2-cell tiny sweep, split into harness and child time."""

from __future__ import annotations

import json

import pytest

from istr.cli import main
from istr.config import to_yaml

from .conftest import REPO

pytestmark = pytest.mark.slow


def test_sweep_overhead_writes_json_and_reuse_trains_nothing(tmp_path, tiny_cfg_factory, capsys):
    preset = tmp_path / "base.yaml"
    preset.write_text(to_yaml(tiny_cfg_factory("train.num_threads=1")))
    spec = tmp_path / "attention.yaml"  # two arms of the attention axis, one seed: 2 cells
    text = (REPO / "sweeps" / "attention.yaml").read_text()
    spec.write_text(text.replace('["self+dynamic", self, dynamic]', '["self+dynamic", self]'))
    root, path = tmp_path / "runs", tmp_path / "overhead.json"
    sets = ["train.max_steps=2", "train.checkpoint_every=2", "logging.wandb=false"]
    argv = ["bench", "--sweep-overhead", "--spec", str(spec), "--preset", str(preset), "--seeds", "1"]
    argv += [f"--set={s}" for s in sets] + ["--root", str(root), "--json", str(path)]
    assert main(argv) == 0
    result = json.loads(path.read_text())
    assert result["sweep"]["n_trials"] == 2 and len(result["trials"]) == 2
    assert result["config"]["sets"][-3:] == sets
    per = result["per_trial"]
    assert per["harness_overhead_s"] >= 0 and 0 <= per["harness_overhead_pct"] < 100
    for t in result["trials"]:
        assert 0 < t["train_s"] < t["wall_s"] and t["startup_eval_s"] == pytest.approx(t["wall_s"] - t["train_s"])
        assert len((root / "overhead" / t["cell_id"] / "metrics.jsonl").read_text().splitlines()) == 2  # 2 steps
    assert result["resume"]["trained"] == 0 and result["reuse"]["trained"] == 0
    assert result["reuse"]["n_trials"] == result["reuse"]["reused"] == 2
    # Resume and reuse start no `istr train`, so each is well under one trained trial.
    assert result["resume"]["wall_s"] < per["child_wall_s"] and result["reuse"]["per_trial_s"] < per["child_wall_s"]
    assert "harness overhead" in capsys.readouterr().out
    assert main(argv) == 2  # a non-empty root would reuse cells: refused
