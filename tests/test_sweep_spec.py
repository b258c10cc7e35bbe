"""Sweep pieces without training: spec validation before any storage, stale status, eval reports,
progress lines, and the W&B sink's helpers (flat config, history replay, cost over attempts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from istr.engine.sinks import CostSink, flat_config, replay_history
from istr.sweep import SpecError, load_spec, run_sweep, sweep_status
from istr.sweep.records import progress_line
from istr.sweep.runner import make_pruner
from istr.sweep.storage import HOST, open_storage
from istr.sweep.trial import EvalReporter
from tests.sweep_helpers import REPO


def _spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "loss.yaml"
    path.write_text(text)
    return path


@pytest.mark.slow  # runs the CLI in a subprocess (~6 s): the fault tier, not the unit loop
def test_malformed_yaml_names_file_and_line_and_creates_no_storage(tmp_path):
    good = (REPO / "sweeps" / "loss.yaml").read_text()
    spec = _spec(tmp_path, good.replace("  goal: maximize", "  goal: maximize\n bad: [indent"))
    root = tmp_path / "runs"
    with pytest.raises(SpecError, match=rf"{spec}:\d+:\d+: malformed YAML"):
        run_sweep(spec, root=root, progress=False)
    assert not root.exists()
    cli = subprocess.run([sys.executable, "-m", "istr", "sweep", str(spec), "--root", str(root)], cwd=REPO,
                         capture_output=True, text=True)
    assert cli.returncode == 2 and str(spec) in cli.stderr and "Traceback" not in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1 and not root.exists()


@pytest.mark.parametrize(("old", "new", "message"), [
    ('["l2+dice", l2, dice]', '["l2+dice", nope]', r"loss.mask='nope' is not a known arm"),
    ("loss.mask:", "loss.nothing:", r"unknown config key 'loss.nothing'"),
    ("method: grid", "method: grid\nearly_terminate: {type: hyperband, min_iter: 2}", "prune grid cells"),
    ("method: grid", "method: grid\nrun_cap: many", "run_cap must be a positive integer"),
])
def test_invalid_spec_fails_naming_the_file_before_any_storage(tmp_path, old, new, message):
    spec = _spec(tmp_path, (REPO / "sweeps" / "loss.yaml").read_text().replace(old, new))
    root = tmp_path / "runs"
    with pytest.raises(SpecError, match=message) as err:
        run_sweep(spec, root=root, progress=False)
    assert str(spec) in str(err.value)
    assert not root.exists()  # no journal, no phantom study


def test_bayes_spec_takes_wandb_early_terminate_as_hyperband_pruner(tmp_path):
    text = (REPO / "sweeps" / "hparams.yaml").read_text().replace(
        "run_cap: 20", "run_cap: 20\nearly_terminate:\n  type: hyperband\n  min_iter: 2\n  eta: 2")
    spec = load_spec(_spec(tmp_path, text))
    assert spec.early_terminate == {"type": "hyperband", "min_iter": 2, "eta": 2}
    assert isinstance(make_pruner(spec.early_terminate), optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner(load_spec(REPO / "sweeps" / "hparams.yaml").early_terminate),
                      optuna.pruners.NopPruner)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_status_shows_a_dead_workers_trial_as_stale(tmp_path):
    root = tmp_path / "runs"
    study = optuna.create_study(study_name="st", storage=open_storage(None, root, "st"))
    study.set_user_attr("cell_ids", ["a", "b", "c"])
    for cell, pid in (("a", _dead_pid()), ("b", None)):
        trial = study.ask()
        trial.set_user_attr("cell_id", cell)
        trial.set_user_attr("host", HOST)
        trial.set_user_attr("pid", pid if pid is not None else os.getpid())
    status = sweep_status("st", None, root)
    assert (status["running"], status["stale"], status["pending"]) == (1, 1, 1)
    assert "is gone" in status["stale_cells"][0] and "cell a" in status["stale_cells"][0]
    assert [t.state for t in study.trials] == [TrialState.RUNNING] * 2  # status only reads


def test_eval_reporter_reports_each_eval_once_and_asks_the_pruner(tmp_path):
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=5.0))
    trial = study.ask()
    metrics = tmp_path / "metrics.jsonl"
    reporter = EvalReporter(trial, metrics, "segm_AP")
    assert reporter.poll() is False  # no file yet
    metrics.write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n" + json.dumps({"step": 2, "eval/segm_AP": 7.5})
                       + "\n" + '{"step": 3, "eval/se')  # the child is mid-line
    assert reporter.poll() is False
    with open(metrics, "a") as handle:
        handle.write('gm_AP": 6.0}\n' + json.dumps({"step": 4, "eval/segm_AP": 2.0}) + "\n")
    assert reporter.poll() is True  # 2.0 < the threshold
    assert reporter.poll() is True and study.trials[0].intermediate_values == {2: 7.5, 3: 6.0, 4: 2.0}


def test_progress_line_names_the_cell_and_gives_an_eta(tmp_path):
    study = optuna.create_study(study_name="pl", storage=open_storage(None, tmp_path, "pl"), direction="maximize")
    study.set_user_attr("cell_ids", ["a", "b", "c"])
    for cell, wall in (("a", 30.0), ("b", 10.0)):
        trial = study.ask()
        for key, value in {"cell_id": cell, "arm": "l2", "seed": 0, "wall_s": wall}.items():
            trial.set_user_attr(key, value)
        study.tell(trial, 1.5)
    line = progress_line(study, "end", study.trials[1]._trial_id)
    assert "end trial 1 cell b (l2, s0)" in line and ": complete 1.5" in line
    assert "2/3 done" in line and "ETA 0:00:20" in line


def test_flat_config_and_history_replay(tmp_path):
    assert flat_config({"loss": {"mask": "l2", "w": {"a": 1}}, "seed": 0}) == {"loss.mask": "l2", "loss.w.a": 1,
                                                                             "seed": 0}
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0}, {"step": 2, "eval/segm_AP": 1.0},
             {"step": 3, "loss": 9.0}, {"step": 3, "loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')
    assert replay_history(path, 0, 3) == [(1, {"loss": 4.0}), (2, {"loss": 3.0, "eval/segm_AP": 1.0}),
                                          (3, {"loss": 2.0})]
    assert replay_history(path, 1, 2) == [(2, {"loss": 3.0, "eval/segm_AP": 1.0})]


def test_cost_sums_every_attempt(tmp_path):
    path = tmp_path / "cost.json"
    first = CostSink(path, batch_size=4, start_step=0)
    first.log(5, {})  # killed after step 5: the file is all that is left of it
    second = CostSink(path, batch_size=4, start_step=4)  # resumed from the step-4 checkpoint
    second.log(6, {})
    second.log(6, {"eval/segm_AP": 1.0})
    totals = second.totals()
    assert totals["attempts"] == 2 and totals["images"] == (5 + 2) * 4
    assert totals["train_seconds"] >= json.loads(path.read_text())["train_seconds"] > 0


def test_exit_status_says_what_still_runs_elsewhere(capsys):
    from istr.sweep.cli import exit_if_unfinished

    counts = {"total": 3, "done": 1, "running": 1, "stale": 0, "failed": 1, "pending": 0,
              "running_cells": ["trial 2 cell abc (l2, s0) on hostB pid 7"]}
    with pytest.raises(SystemExit) as err:
        exit_if_unfinished(counts)
    assert err.value.code == 3 and "trial 2 cell abc (l2, s0) on hostB pid 7" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        exit_if_unfinished({**counts, "running": 0, "running_cells": []})
    assert err.value.code == 1 and "1/3 cells done (1 failed" in capsys.readouterr().err
    exit_if_unfinished({**counts, "done": 3, "running": 0, "failed": 0})  # all done: returns
