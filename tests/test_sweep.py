"""Sweep harness: the specs in sweeps/ and the CLI (unit tests), and end to end (marked slow) with real Optuna
storages (journal file, PostgreSQL) and real trainings, each trial a tiny 2-step training in a subprocess (a few
seconds each on a CPU).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from istr.config import load_config
from istr.sweep import load_spec, run_sweep, sweep_status
from istr.sweep.cli import add_parsers
from istr.sweep.spec import cell_identity
from istr.sweep.storage import open_storage
from tests.sweep_helpers import cell_dirs, metrics_lines, read_rows, wandb_run, write_setup

from .conftest import REPO

AXES = {"embedding", "embedding_dim", "mask_cost", "loss", "attention"}  # the grid specs of the ablation tables


def test_sweep_specs_are_wandb_configs_and_expand():
    default_id = cell_identity(load_config(REPO / "experiments" / "tiny.yaml", ["seed=0"]))
    for path in sorted((REPO / "sweeps").glob("*.yaml")):
        spec = load_spec(path)
        raw = spec.raw
        assert {"method", "metric", "parameters", "command"} <= set(raw)
        assert raw["metric"] == {"name": "segm_AP", "goal": "maximize"}
        for token in ("${env}", "${interpreter}", "-m", "istr", "train", "--config", "${args_no_hyphens}"):
            assert token in raw["command"], (path, token)
        assert spec.preset == "experiments/tiny.yaml"
        if path.stem == "hparams":
            assert spec.method == "bayes" and spec.run_cap > 0
            assert {"train.lr", "train.weight_decay", "loss.weight_mask"} <= set(spec.parameters)
            continue
        assert spec.method == "grid"
        # the grid as the YAML writes it: one cell per combination of the listed values, seeds last
        values = {key: p["values"] if "values" in p else [p["value"]] for key, p in raw["parameters"].items()}
        arms = math.prod(len(v) for key, v in values.items() if key != "seed")
        cells = spec.cells()
        assert len(cells) == arms * len(values["seed"]), path.stem
        assert [c.seed for c in cells] == values["seed"] * arms
        assert len({c.arm for c in cells}) == arms
        assert len(spec.with_seeds(3).cells()) == arms * 3
        # every arm is a valid config for the preset and a training of its own, and the default arm is one cell
        # shared by all axes (seed 0 of each arm: a seed is one more config key)
        preset = REPO / "experiments" / "tiny.yaml"
        ids = {cell_identity(load_config(preset, cell.overrides)) for cell in cells if cell.seed == 0}
        assert len(ids) == arms and default_id in ids, path.stem
    assert AXES <= {p.stem for p in (REPO / "sweeps").glob("*.yaml")}


@pytest.mark.slow
def test_wandb_agent_command_trains_the_cells_of_the_optuna_harness():
    """What `wandb agent` would run for each cell (W&B's own ${args_no_hyphens} expansion and macro
    substitution) parses as `istr train` and resolves to the cell the local harness trains."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    from istr.cli import build_parser

    for path in sorted((REPO / "sweeps").glob("*.yaml")):
        spec = load_spec(path)
        if spec.method != "grid":
            continue
        for cell in spec.cells():
            agent_vars = create_sweep_command_args({"args": {k: {"value": v} for k, v in cell.params.items()}})
            agent_vars.update(env=["/usr/bin/env"], interpreter=["python"])
            command = []
            for chunk in spec.raw["command"]:  # the agent's own macro substitution (wandb_agent.py)
                command += agent_vars.get(chunk[2:-1], []) if chunk.startswith("${") else [chunk]
            assert command[:4] == ["/usr/bin/env", "python", "-m", "istr"], command
            args = build_parser().parse_args(command[4:])
            cfg = load_config(REPO / args.config, args.overrides)
            harness = load_config(REPO / spec.preset, cell.overrides)
            assert cell_identity(cfg) == cell_identity(harness), (path.stem, cell.params)


def test_workers_split_the_cpu_threads_which_do_not_change_the_cell(tiny_cfg_factory):
    from istr.sweep.runner import build_plan, threads_per_trial

    assert threads_per_trial(1) == 0 and threads_per_trial(10**6) == 1
    assert threads_per_trial(2) == max(1, (os.cpu_count() or 1) // 2)
    one, three = tiny_cfg_factory("train.num_threads=1"), tiny_cfg_factory("train.num_threads=3")
    assert cell_identity(one) == cell_identity(three) != cell_identity(tiny_cfg_factory("train.lr=1e-3"))
    cell = load_spec(REPO / "sweeps" / "loss.yaml").cells()[0]
    _, plan = build_plan(REPO / "sweeps" / "loss.yaml", workers=10**6)
    assert load_config(plan.preset, plan.overrides(cell.params)).train.num_threads == 1
    _, plan = build_plan(REPO / "sweeps" / "loss.yaml", workers=10**6, sets=["train.num_threads=5"])
    assert load_config(plan.preset, plan.overrides(cell.params)).train.num_threads == 5  # --set wins


@pytest.mark.slow
def test_grid_completes_rerun_trains_nothing_and_reuses_across_studies(tmp_path, tiny_cfg_factory):
    preset, spec = write_setup(tmp_path, tiny_cfg_factory, ["l2+dice", "l2"])
    root = tmp_path / "runs"
    kw = dict(preset=str(preset), seeds=2, sets=["logging.wandb=false"], root=root, progress=False)
    counts = run_sweep(spec, study_name="grid", **kw)
    assert counts["done"] == 4 and counts["failed"] == 0
    rows = read_rows(root, "grid")
    assert len(rows) == 4
    assert {(r["arm"], r["seed"]) for r in rows} == {("l2+dice", "0"), ("l2+dice", "1"), ("l2", "0"), ("l2", "1")}
    assert all(r["axis"] == "loss" and r["steps"] == "2" and r["segm_AP"] != "" for r in rows)
    dirs = cell_dirs(root, "grid")
    assert {d.name for d in dirs} == {r["cell_id"] for r in rows}
    before = metrics_lines(dirs)
    assert sweep_status("grid", None, root)["remaining"] == 0

    counts = run_sweep(spec, study_name="grid", **kw)  # re-run: nothing to do
    assert counts["trials"] == 4 and metrics_lines(cell_dirs(root, "grid")) == before
    assert len(read_rows(root, "grid")) == 4

    run_sweep(spec, study_name="other", **kw)  # same cells in another study: reused, not trained
    other = read_rows(root, "other")
    assert len(other) == 4 and all(r["reused_from"] for r in other)
    assert cell_dirs(root, "other") == [] and metrics_lines(cell_dirs(root, "grid")) == before

    counts = run_sweep(spec, study_name="grid", **{**kw, "seeds": 3})  # widened seed grid: only seed 2 trains
    assert counts["done"] == 6 and counts["failed"] == 0
    assert sorted(r["seed"] for r in read_rows(root, "grid")) == ["0", "0", "1", "1", "2", "2"]
    after = metrics_lines(cell_dirs(root, "grid"))
    assert len(after) == 6 and {name: after[name] for name in before} == before


@pytest.mark.slow
def test_two_workers_share_a_journal_and_run_each_cell_once(tmp_path, tiny_cfg_factory):
    preset, spec = write_setup(tmp_path, tiny_cfg_factory, ["l2+dice", "l2"])
    root = tmp_path / "runs"
    counts = run_sweep(spec, preset=str(preset), seeds=1, sets=["logging.wandb=false"], study_name="two",
                       workers=2, root=root, progress=False)
    assert counts["done"] == 2
    study = optuna.load_study(study_name="two", storage=open_storage(None, root, "two"))
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 2 and len({t.user_attrs["cell_id"] for t in complete}) == 2
    assert not [t for t in study.trials if t.state == TrialState.FAIL]
    assert set(metrics_lines(cell_dirs(root, "two")).values()) == {2}  # trained once each
    assert len({t.user_attrs["pid"] for t in complete}) >= 1
    assert len(read_rows(root, "two")) == 2


@pytest.mark.slow
def test_bayes_hparams_spec_runs_tpe_within_its_bounds_and_resumes(tmp_path, tiny_cfg_factory):
    """sweeps/hparams.yaml end to end: TPE trials in the spec's log/uniform bounds, budget = --trials, and each
    train.eval_every evaluation reported to Optuna (the dashboard's intermediate values)."""
    preset, _ = write_setup(tmp_path, tiny_cfg_factory, ["l2"])
    root = tmp_path / "runs"
    spec = load_spec(REPO / "sweeps" / "hparams.yaml")
    args = dict(preset=str(preset), sets=["logging.wandb=false", "train.eval_every=1"], study_name="hp", root=root,
                progress=False)
    counts = run_sweep(REPO / "sweeps" / "hparams.yaml", trials=3, **args)
    assert counts["done"] == 3
    study = optuna.load_study(study_name="hp", storage=open_storage(None, root, "hp"))
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and len({t.params["train.lr"] for t in complete}) == 3
    assert complete[0].distributions["train.lr"].log and not complete[0].distributions["loss.weight_l1"].log
    assert all(list(t.intermediate_values) == [1] for t in complete)  # step 1 of 2 (step 2 is the final value)
    for trial in complete:
        for key in ("train.lr", "train.weight_decay", "loss.weight_class", "loss.weight_l1", "loss.weight_giou",
                    "loss.weight_mask"):
            bounds = spec.parameters[key]
            assert bounds["min"] <= trial.params[key] <= bounds["max"], key
        cfg = load_config(Path(trial.user_attrs["run_dir"]) / "config.yaml")
        assert cfg.train.lr == pytest.approx(trial.params["train.lr"])  # the suggestion reached the training
    rows = read_rows(root, "hp")
    assert len(rows) == 3 and all(r["axis"] == "hparams" and "train.lr=" in r["arm"] for r in rows)
    before = metrics_lines(cell_dirs(root, "hp"))
    assert run_sweep(REPO / "sweeps" / "hparams.yaml", trials=3, **args)["done"] == 3
    assert metrics_lines(cell_dirs(root, "hp")) == before  # the budget is spent: nothing trains again


@pytest.mark.slow
def test_killed_worker_leaves_cell_rerunnable_as_one_wandb_run(tmp_path, tiny_cfg_factory, monkeypatch):
    """SIGKILL mid-training, then the same command: the cell resumes into the same W&B run (one offline run
    whose history covers every step), and its cost sums both attempts."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    preset, spec = write_setup(tmp_path, tiny_cfg_factory, ["l2"], "train.checkpoint_every=1", "logging.wandb=true")
    root = tmp_path / "runs"
    code = (
        "from pathlib import Path; from istr.sweep import run_sweep; "
        f"run_sweep({str(spec)!r}, preset={str(preset)!r}, seeds=1, sets=['train.max_steps=30'], "
        f"study_name='kill', root=Path({str(root)!r}), progress=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, cwd=REPO)
    deadline = time.time() + 240
    try:
        while not list((root / "kill").glob("*/checkpoints/last.pt")):
            assert proc.poll() is None, "sweep ended before it could be killed"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        assert list((root / "kill" / "leases").glob("trial-*.json"))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    status = sweep_status("kill", None, root)
    assert (status["running"], status["stale"], status["done"]) == (0, 1, 0)  # its worker pid is gone

    counts = run_sweep(spec, preset=str(preset), seeds=1, sets=["train.max_steps=30"], study_name="kill", root=root,
                       progress=False)
    assert counts["done"] == 1 and counts["running"] == 0
    (row,) = read_rows(root, "kill")
    assert row["steps"] == "30" and row["attempts"] == "2"
    # the killed attempt left checkpoints/last.pt, so the re-run had to continue it with --resume
    # (a fresh `istr train` into that dir refuses to start)
    states = [t.state for t in optuna.load_study(study_name="kill", storage=open_storage(None, root, "kill")).trials]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 1
    run_dir = Path(row["run_dir"])
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["attempts"] == 2 and summary["train_seconds"] > summary["attempt_seconds"]
    (offline,) = (run_dir / "wandb").glob("offline-run-*")  # the killed attempt's is set aside
    assert list((run_dir / "wandb-attempts").glob("offline-run-*"))
    info, history = wandb_run(offline)
    assert info["run_id"] == row["wandb_run_id"]
    assert sorted(h["_step"] for h in history if "loss" in h) == list(range(1, 31))


def test_cli_parsers_dispatch_status(tmp_path, tiny_cfg_factory, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="istr")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sweep", "loss", "--preset", "tiny", "--seeds", "3", "--set", "train.max_steps=2",
                              "--workers", "2", "--storage", "postgresql://x", "--trial-timeout", "60"])
    assert (args.spec, args.preset, args.seeds, args.workers) == ("loss", "tiny", 3, 2)
    assert args.sets == ["train.max_steps=2"]
    args = parser.parse_args(["sweep", "status", "nope", "--root", str(tmp_path)])
    with pytest.raises(FileNotFoundError):
        args.func(args)


@pytest.mark.slow
def test_trial_is_an_offline_wandb_run_readable_by_wandb(tmp_path, tiny_cfg_factory, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    preset, spec = write_setup(tmp_path, tiny_cfg_factory, ["l2"])
    root = tmp_path / "runs"
    run_sweep(spec, preset=str(preset), seeds=1, study_name="wb", root=root, progress=False)
    (row,) = read_rows(root, "wb")
    assert row["wandb_run_id"]
    (offline,) = (Path(row["run_dir"]) / "wandb").glob("offline-run-*")
    summary, history = wandb_run(offline)
    assert summary["run_id"] == row["wandb_run_id"]
    assert summary["config"]["loss"]["mask"] == "l2" and summary["config"]["loss.mask"] == "l2"  # nested + flat
    assert summary["config"]["logging"]["wandb_group"] == "wb"
    assert summary["config"]["logging"]["wandb_job_type"] == "loss"
    assert summary["summary"]["segm_AP"] == pytest.approx(float(row["segm_AP"]))
    assert len(history) == 2 and all("loss" in h for h in history)
    assert summary["name"] == "loss/l2/s0" and summary["state"] == "finished"
    assert set(summary["tags"]) == {"axis:loss", "arm:l2", "seed:0", "study:wb", f"cell:{row['cell_id']}"}


@pytest.mark.slow
def test_sweep_to_paper_tables_end_to_end(tmp_path, tiny_cfg_factory, monkeypatch):
    """A 2-arm x 2-seed tiny sweep -> analysis.tables -> files that hold both arms."""
    from analysis import plots, tables

    monkeypatch.setenv("WANDB_MODE", "disabled")
    preset, spec = write_setup(tmp_path, tiny_cfg_factory, ["l2+dice", "l2"])
    root = tmp_path / "runs"
    run_sweep(spec, preset=str(preset), seeds=2, study_name="loss", root=root, progress=False)
    out = tmp_path / "results"
    assert tables.main(["--runs", str(root), "--out", str(out)]) == 0
    for suffix in ("md", "tex", "csv"):
        text = (out / f"loss.{suffix}").read_text()
        assert "l2+dice" in text and "l2" in text.replace("l2+dice", "")
    assert "(default)" in (out / "loss.md").read_text()
    assert plots.main(["--runs", str(root), "--out", str(out / "figures")]) == 0
    assert (out / "figures" / "loss_mask_ap.png").is_file()
