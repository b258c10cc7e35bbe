"""A user's folder is never written into, bad starts stop before any write, a finished run keeps its weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from istr.cli import main
from istr.config import to_yaml
from istr.engine.checkpoint import CheckpointError, has_training_state
from istr.engine.rundir import RunDirError, check_run_dir, claim_run_dir, claimed, marker
from istr.engine.train import train
from istr.results import CHECKPOINT_FILE, RUN_MARKER_FILE


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def config_file(tiny_cfg, tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(to_yaml(tiny_cfg))
    return path


def istr_train(config: Path, out: Path, *extra: str) -> int:
    return main(["train", "--config", str(config), "--out", str(out), *extra])


@pytest.mark.parametrize("name", ["eval.json", "config.yaml", "metrics.jsonl", "checkpoints/last.pt"])
def test_out_holding_a_users_file_is_refused_untouched(config_file, tmp_path, capsys, name):
    user = tmp_path / "mine"
    (user / name).parent.mkdir(parents=True)
    (user / name).write_bytes(b"the user's own bytes")
    before = snapshot(user)
    assert istr_train(config_file, user) == 2
    assert "not a run dir of this project" in capsys.readouterr().err
    assert snapshot(user) == before


@pytest.mark.parametrize("name", ["config.yaml", "checkpoints/last.pt"])
def test_resume_into_a_users_folder_is_refused_untouched(config_file, tmp_path, capsys, name):
    user = tmp_path / "mine"
    (user / name).parent.mkdir(parents=True)
    (user / name).write_bytes(b"the user's own bytes")
    before = snapshot(user)
    assert istr_train(config_file, user, "--resume") == 2
    assert f"{user} is not a run dir of this project" in capsys.readouterr().err
    assert snapshot(user) == before


def test_corrupt_checkpoint_is_one_line_naming_the_file_and_nothing_is_written(config_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    claim_run_dir(run_dir)
    (run_dir / CHECKPOINT_FILE).parent.mkdir()
    (run_dir / CHECKPOINT_FILE).write_bytes(b"\x80\x02 not a pickle")
    before = snapshot(run_dir)
    assert istr_train(config_file, run_dir, "--resume") == 2
    err = capsys.readouterr().err
    assert str(run_dir / CHECKPOINT_FILE) in err and "not a readable checkpoint" in err and len(err.splitlines()) == 1
    assert snapshot(run_dir) == before


def test_bad_config_and_unwritable_out_stop_before_any_data_work(config_file, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    # data.root names no dataset: a check reached after the data work would blame the data instead
    assert istr_train(config_file, a_file / "run", f"data.root={tmp_path / 'nowhere'}") == 2
    assert "a_file is a file, so the folder cannot be made" in capsys.readouterr().err
    assert istr_train(config_file, tmp_path / "run", "codec.dim=10000") == 2
    assert "codec.dim=10000 is out of range" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  lr: [1e-4\nmodel: {}\n")
    assert main(["train", "--config", str(broken), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{broken}: line" in err and "not valid YAML" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_failed_start_leaves_each_kind_of_folder_as_it_was(tmp_path):
    missing, empty, ours = tmp_path / "new" / "deeper", tmp_path / "empty", tmp_path / "ours"
    empty.mkdir()
    claim_run_dir(ours)
    (ours / "train.log").write_text("the sweep's log")
    before = snapshot(ours)
    for folder in (missing, empty, ours):
        with pytest.raises(RuntimeError), claimed(folder, {"config_hash": "x"}):
            (folder / "config.yaml").write_text("written by the failed start")
            raise RuntimeError("setup failed")
    assert not (tmp_path / "new").exists()
    assert list(empty.iterdir()) == []
    assert snapshot(ours) == before


def test_a_killed_checkpoint_writes_temp_file_is_removed_on_the_next_start(tmp_path):
    run_dir = tmp_path / "run"
    claim_run_dir(run_dir)
    stale = run_dir / "checkpoints" / ".last.pt.k1ll3d.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"half a checkpoint")
    with claimed(run_dir, {}):
        pass
    assert not stale.exists() and marker(run_dir) is not None


def test_check_run_dir_accepts_what_the_project_made_and_names_the_folder_otherwise(tmp_path):
    check_run_dir(tmp_path / "missing", resume=False)
    check_run_dir(tmp_path, resume=False)  # empty
    (tmp_path / RUN_MARKER_FILE).write_text(json.dumps({"config_hash": "not made by istr"}))
    with pytest.raises(RunDirError, match=str(tmp_path)):
        check_run_dir(tmp_path, resume=False)


@pytest.mark.slow
def test_finished_run_keeps_weights_only_and_resume_reevaluates_it(tiny_cfg_factory, tmp_path):
    run_dir = tmp_path / "run"
    metrics = train(tiny_cfg_factory(), run_dir)
    final = torch.load(run_dir / CHECKPOINT_FILE, weights_only=False)
    assert not has_training_state(final) and final["step"] == 4
    # the same command again (a sweep worker after a kill between checkpoint and eval) evaluates again
    assert train(tiny_cfg_factory(), run_dir, resume=True) == metrics
    before = snapshot(run_dir)
    with pytest.raises(CheckpointError, match="keep_optimizer_state"):
        train(tiny_cfg_factory("train.max_steps=6"), run_dir, resume=True)
    assert snapshot(run_dir) == before
    kept = tmp_path / "kept"
    train(tiny_cfg_factory("train.keep_optimizer_state=true"), kept)
    assert has_training_state(torch.load(kept / CHECKPOINT_FILE, weights_only=False))
