"""Training: the lr schedule (unit tests), and end to end on tiny generated datasets (CPU, marked slow): train+eval,
resume, faults, DDP, a COCO-shaped dataset, W&B."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from istr.config import ConfigError, load_config, to_yaml
from istr.data.synth import generate_synthetic_coco
from istr.engine.optim import build_optimizer, lr_factor
from istr.engine.rundir import RunDirError
from istr.engine.step import NonFiniteLossError
from istr.engine.train import train

from .conftest import free_port


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


COCO_CATEGORY_IDS = [1, 5, 18, 44, 51, 62, 90]  # sparse, as COCO's 80 ids in 1..90; one per synth category


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (what crowd regions use): run lengths in column-major order, zeros first."""
    flat = mask.flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"size": list(mask.shape), "counts": [0, *counts] if flat[0] else counts}


def write_coco_shaped_dataset(out: Path, shapes: Path, pad: int = 32) -> Path:
    """The shapes dataset at ``shapes`` rewritten the way real COCO differs from it: non-square JPEG photos (padded
    ``pad`` pixels on the right), both splits in one ``images`` folder under COCO's 12-digit names, sparse image and
    category ids, the first instance of each image a polygon, and one crowd region (uncompressed RLE) per split."""
    (out / "images").mkdir(parents=True)
    (out / "annotations").mkdir()
    for split, id_base in (("train", 1000), ("val", 5000)):
        data = json.loads((shapes / "annotations" / f"instances_{split}.json").read_text())
        category = {c["id"]: COCO_CATEGORY_IDS[i] for i, c in enumerate(data["categories"])}
        image_id = {image["id"]: id_base + 7 * image["id"] for image in data["images"]}
        for image in data["images"]:
            pixels = np.asarray(Image.open(shapes / "images" / split / image["file_name"]).convert("RGB"))
            pixels = np.pad(pixels, ((0, 0), (0, pad), (0, 0)), constant_values=128)
            new_id = image_id[image["id"]]
            image.update(id=new_id, file_name=f"{new_id:012d}.jpg", width=image["width"] + pad)
            Image.fromarray(pixels).save(out / "images" / image["file_name"], quality=95)
        sizes = {image["id"]: (image["height"], image["width"]) for image in data["images"]}
        first = set()
        for ann in data["annotations"]:
            ann.update(image_id=image_id[ann["image_id"]], category_id=category[ann["category_id"]])
            if ann["image_id"] not in first:  # a polygon: the instance's box
                first.add(ann["image_id"])
                x, y, w, h = ann["bbox"]
                ann.update(segmentation=[[x, y, x + w, y, x + w, y + h, x, y + h]], area=w * h)
            else:  # its RLE, padded as its image was
                mask = np.pad(mask_utils.decode(ann["segmentation"]), ((0, 0), (0, pad)))
                rle = mask_utils.encode(np.asfortranarray(mask))
                ann["segmentation"] = {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}
        crowd_image = data["images"][0]
        crowd = np.zeros(sizes[crowd_image["id"]], dtype=np.uint8)
        crowd[: pad, -pad:] = 1  # in the padding: a region of "many objects" that evaluation must ignore
        data["annotations"].append({"id": 10**6, "image_id": crowd_image["id"], "category_id": COCO_CATEGORY_IDS[0],
                                    "iscrowd": 1, "area": float(pad * pad), "segmentation": _uncompressed_rle(crowd),
                                    "bbox": [crowd_image["width"] - pad, 0, pad, pad]})
        data["categories"] = [{**c, "id": category[c["id"]]} for c in data["categories"]]
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return out


@pytest.mark.slow
def test_coco_shaped_dataset_trains_and_evaluates_in_its_own_ids(tiny_cfg_factory, tmp_path):
    """Real COCO's shape, generated here: the run trains on it, and evaluates in its own image and category ids
    (a label mapped to the wrong id would be left out by COCOeval) on the original, non-square image sizes."""
    shapes = tmp_path / "shapes"
    generate_synthetic_coco(shapes, num_train=16, num_val=4, seed=5, image_size=96, max_instances=3,
                            min_object_frac=0.25, max_object_frac=0.6)
    root = write_coco_shaped_dataset(tmp_path / "coco", shapes)
    cfg = tiny_cfg_factory(f"data.root={root}", "data.train_images=images", "data.val_images=images",
                           "data.train_short_sizes=[80]", "data.train_max_size=112", "data.test_short_size=80",
                           "data.test_max_size=112", "train.max_steps=2", "eval.max_detections=20")
    run_dir = tmp_path / "run"
    metrics = train(cfg, run_dir)
    assert set(metrics) == {"bbox", "segm"}
    assert all(v is None or 0 <= v <= 100 for m in metrics.values() for v in m.values())
    assert (run_dir / "eval.txt").read_text().count("Average Precision") == 12  # 6 per IoU type
    val = json.loads((root / "annotations" / "instances_val.json").read_text())
    with np.load(run_dir / "eval_images.npz") as records:
        assert sorted(records["image_ids"].tolist()) == sorted(image["id"] for image in val["images"])
        assert records["category_ids"].tolist() == COCO_CATEGORY_IDS
        assert len(records["det_image"]) == 20 * len(val["images"])  # every detection in a category of the dataset
        assert records["image_gt"].sum() == sum(not ann["iscrowd"] for ann in val["annotations"])  # crowd: ignored


@pytest.mark.slow
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
