"""End-to-end training tests on a tiny generated dataset (CPU): train+eval, resume, faults, DDP."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from istr.config import ConfigError, load_config, to_yaml
from istr.engine.rundir import RunDirError
from istr.engine.train import NonFiniteLossError, build_optimizer, lr_factor, train

from .conftest import COCO_MINI, free_port, tiny_overrides

pytestmark = pytest.mark.slow


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_warmup_and_decay():
    assert lr_factor(0, 10, 0.01, [20], 0.1) == pytest.approx(0.01)
    assert lr_factor(5, 10, 0.01, [20], 0.1) == pytest.approx(0.505)
    assert lr_factor(10, 10, 0.01, [20], 0.1) == 1.0
    assert lr_factor(25, 10, 0.01, [20, 30], 0.1) == pytest.approx(0.1)


def test_cosine_schedule_warms_up_then_falls_to_zero_and_ignores_lr_steps():
    assert lr_factor(5, 10, 0.01, [20], 0.1, cosine_steps=110) == pytest.approx(0.505)
    assert lr_factor(10, 10, 0.01, [20], 0.1, cosine_steps=110) == 1.0
    assert lr_factor(60, 10, 0.01, [20], 0.1, cosine_steps=110) == pytest.approx(0.5)
    assert lr_factor(110, 10, 0.01, [20], 0.1, cosine_steps=110) == pytest.approx(0.0)


def test_backbone_lr_mult_scales_only_the_backbone_and_follows_the_schedule():
    model = torch.nn.Module()
    model.backbone, model.head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    overrides = ["train.lr=1e-3", "train.backbone_lr_mult=0.1", "train.warmup_steps=0", "train.lr_steps=[1]"]
    cfg = load_config(None, overrides)
    optimizer, scheduler = build_optimizer(model, cfg.train)
    head, backbone = optimizer.param_groups
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.backbone.parameters()}
    assert (head["lr"], backbone["lr"]) == pytest.approx((1e-3, 1e-4))
    optimizer.step()
    scheduler.step()
    assert (head["lr"], backbone["lr"]) == pytest.approx((1e-4, 1e-5))
    assert len(build_optimizer(model, load_config(None, []).train)[0].param_groups) == 1


def test_lr_schedule_key_is_checked():
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        load_config(None, ["train.lr_schedule=linear"])


def test_train_writes_run_dir_and_coco_eval(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    metrics = train(tiny_cfg, run_dir)
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "checkpoints/last.pt", "codec.pt", "run.json"):
        assert (run_dir / name).is_file(), name
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved == metrics
    assert set(saved) == {"bbox", "segm"}
    assert set(saved["segm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert all(v is None or 0 <= v <= 100 for m in saved.values() for v in m.values())
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows)
    with pytest.raises(RunDirError, match="--resume"):
        train(tiny_cfg, run_dir)


def test_resume_continues_exactly(tiny_cfg_factory, tmp_path):
    straight = tmp_path / "straight"
    train(tiny_cfg_factory(), straight)
    interrupted = tmp_path / "interrupted"
    train(tiny_cfg_factory("train.max_steps=2", "train.keep_optimizer_state=true"), interrupted)
    train(tiny_cfg_factory(), interrupted, resume=True)
    expected, resumed = read_metrics(straight), read_metrics(interrupted)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(expected, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a["step"], a["loss"], b["loss"])
    final_a = torch.load(straight / "checkpoints" / "last.pt", weights_only=False)["model"]
    final_b = torch.load(interrupted / "checkpoints" / "last.pt", weights_only=False)["model"]
    for key in final_a:
        torch.testing.assert_close(final_a[key], final_b[key], rtol=1e-4, atol=1e-5)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_cfg_factory, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_cfg_factory("train.max_steps=2", "train.keep_optimizer_state=true"), run_dir)
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(NonFiniteLossError, match=r"step 3.*last good checkpoint"):
        nan_cfg = tiny_cfg_factory()
        nan_cfg.loss.weight_giou = float("nan")  # load_config rejects it; set after, as a run-time fault
        train(nan_cfg, run_dir, resume=True)
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


def test_corrupt_image_fails_with_file_name(tiny_cfg_factory, synth_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    victim = sorted((root / "images" / "train").iterdir())[0]
    victim.write_bytes(b"not a png")
    cfg = tiny_cfg_factory(f"data.root={root}")
    from istr.data.coco import DatasetError

    with pytest.raises(DatasetError, match=victim.name):
        train(cfg, tmp_path / "run")


def _istr_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def test_torchrun_two_ranks_end_with_identical_weights(tiny_cfg, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(to_yaml(tiny_cfg))
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "istr", "train", "--config", str(config), "--out", str(run_dir), "train.num_threads=1"]
    result = subprocess.run(cmd, env=_istr_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    first, second = summary["param_checksums"]
    assert first == second
    assert (run_dir / "eval.json").is_file()


@pytest.mark.skipif(not COCO_MINI.is_dir(), reason=f"real-data smoke test needs {COCO_MINI} (not in the repo)")
def test_coco_mini_trains_and_evaluates(tmp_path):
    from istr.config import load_config

    overrides = [o for o in tiny_overrides(COCO_MINI, tmp_path / "cache") if not o.startswith("data.")]
    overrides += [f"data.root={COCO_MINI}", "data.train_json=annotations/instances_train.json",
                  "data.train_images=images", "data.val_json=annotations/instances_val.json",
                  "data.val_images=images", "data.train_short_sizes=[160]", "data.train_max_size=256",
                  "data.test_short_size=160", "data.test_max_size=256", "data.num_workers=0", "train.max_steps=2",
                  "codec.max_fit_masks=400", "eval.max_detections=20"]
    cfg = load_config(None, overrides)
    metrics = train(cfg, tmp_path / "run")
    assert set(metrics) == {"bbox", "segm"}
    assert (tmp_path / "run" / "eval.txt").read_text().count("Average Precision") == 12  # 6 per IoU type
    assert cfg.model.num_queries == 8


def test_wandb_offline_run_is_written_and_disabled_is_respected(tiny_cfg_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "offline"
    train(tiny_cfg_factory("logging.wandb=true", "train.max_steps=2"), run_dir)
    run_id = json.loads((run_dir / "train_summary.json").read_text())["wandb_run_id"]
    assert run_id and list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))

    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_dir = tmp_path / "disabled"
    train(tiny_cfg_factory("logging.wandb=true", "train.max_steps=2"), run_dir)
    assert not list(run_dir.glob("wandb/offline-run-*"))
    assert (run_dir / "eval.json").is_file()

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_RUN_ID", "agent0run")  # what `wandb agent` sets for the run it launched
    run_dir = tmp_path / "agent"
    train(tiny_cfg_factory("logging.wandb=true", "train.max_steps=2"), run_dir)
    assert json.loads((run_dir / "train_summary.json").read_text())["wandb_run_id"] == "agent0run"
