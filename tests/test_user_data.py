"""A user's own COCO dataset: no synthetic data written over it, both splits checked before training,
numeric config values checked, each on a small dataset made here (docs/own-data.md)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from istr.cli import main
from istr.config import ConfigError, load_config
from istr.data.build import check_dataset, ensure_dataset
from istr.data.checks import check_images
from istr.data.coco import DatasetError
from istr.data.synth import MARKER, NotOurFolderError, generate_synthetic_coco
from istr.engine.optim import schedule_steps
from istr.engine.train import train

from .conftest import REPO

SIDE = 48


def make_user_dataset(root: Path, images_per_split: int = 3) -> Path:
    """A tiny real-looking dataset: JPEG photos with one polygon instance each, COCO json per split."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        images, annotations = [], []
        for index in range(1, images_per_split + 1):
            name = f"photo_{split}_{index}.jpg"
            pixels = np.random.default_rng(index).integers(0, 255, (SIDE, SIDE + 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / split / name, quality=90)
            images.append({"id": index, "file_name": name, "height": SIDE, "width": SIDE + 8})
            annotations.append({"id": 100 + index, "image_id": index, "category_id": 7, "iscrowd": 0,
                                "area": 400.0, "bbox": [10, 10, 20, 20],
                                "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": [{"id": 7, "name": "thing"}]}
        ))
    return root


def user_overrides(root: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", "data.train_json=annotations/instances_train.json", "data.train_images=images/train",
            "data.val_json=annotations/instances_val.json", "data.val_images=images/val",
            f"cache_dir={tmp_path / 'cache'}", *extra]


def checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_mistyped_root_names_data_root(tmp_path, capsys):
    cfg = load_config(None, user_overrides(tmp_path / "no_such_dataset", tmp_path))
    with pytest.raises(DatasetError, match=r"data\.root=.*no_such_dataset does not exist"):
        ensure_dataset(cfg.data)
    out = tmp_path / "run"
    assert main(["train", "--config", str(REPO / "experiments" / "finetune.yaml"), "--out", str(out),
                 *user_overrides(tmp_path / "no_such_dataset", tmp_path)]) == 2
    assert "data.root=" in capsys.readouterr().err
    assert not out.exists()


def test_mistyped_json_with_synth_on_leaves_user_files_byte_identical(tmp_path, capsys):
    root = make_user_dataset(tmp_path / "mine")
    before = checksums(root)
    overrides = user_overrides(root, tmp_path, "data.synth.enabled=true",
                               "data.val_json=annotations/instances_vall.json")
    out = tmp_path / "run"
    assert main(["train", "--config", str(REPO / "experiments" / "tiny.yaml"), "--out", str(out), *overrides]) == 2
    err = capsys.readouterr().err
    assert "data.synth.enabled=false" in err and "data.val_json" in err and str(root) in err
    assert checksums(root) == before  # same files, same bytes: nothing written, nothing added
    assert not out.exists()


def test_generator_refuses_a_folder_it_did_not_make(tmp_path):
    root = make_user_dataset(tmp_path / "mine")
    before = checksums(root)
    with pytest.raises(NotOurFolderError, match=str(root)):
        generate_synthetic_coco(root, 2, 1, image_size=32)
    assert checksums(root) == before
    own = tmp_path / "generated"
    generate_synthetic_coco(own, 2, 1, image_size=32)
    generate_synthetic_coco(own, 2, 1, image_size=32, seed=1)  # its own folder: regenerating is fine
    assert json.loads((own / MARKER).read_text())["seed"] == 1


def test_synth_off_uses_the_users_dataset_as_is(tmp_path):
    root = make_user_dataset(tmp_path / "mine")
    before = checksums(root)
    cfg = load_config(None, user_overrides(root, tmp_path))
    ensure_dataset(cfg.data)
    check_dataset(cfg.data, tmp_path / "cache")
    assert checksums(root) == before


def _unknown_category(data: dict) -> None:
    data["annotations"][1]["category_id"] = 99


def _negative_box(data: dict) -> None:
    data["annotations"][0]["bbox"] = [1, 1, -4, 5]


def _bad_iscrowd(data: dict) -> None:
    data["annotations"][2]["iscrowd"] = 2


def _wrong_width(data: dict) -> None:
    data["images"][1]["width"] = SIDE


def _duplicate_image_id(data: dict) -> None:
    # Photos 2 and 3 share id 2: one would vanish and both annotations be drawn onto the other.
    data["images"][2]["id"] = data["annotations"][2]["image_id"] = 2


def _no_annotations(data: dict) -> None:
    data["annotations"] = []  # trained every step, then evaluated to an eval.json of nulls


@pytest.mark.parametrize(("edit", "needles"), [
    (_unknown_category, ["annotation id 102", "category id 99", "instances_val.json"]),
    (_negative_box, ["annotation id 101", "'bbox'", "instances_val.json"]),
    (_bad_iscrowd, ["annotation id 103", "'iscrowd'", "instances_val.json"]),
    (_wrong_width, ["photo_val_2.jpg", "image id 2", "instances_val.json", "'width'"]),
    (_duplicate_image_id, ["instances_val.json: image ids 2 ", "'images'"]),
    (_no_annotations, ["instances_val.json has no usable annotations", "data.val_json"]),
])
def test_bad_val_record_fails_before_anything_is_written(tmp_path, edit, needles):
    root = make_user_dataset(tmp_path / "mine")
    edit_json(root / "annotations" / "instances_val.json", edit)
    cfg = load_config(None, user_overrides(root, tmp_path))
    out = tmp_path / "run"
    with pytest.raises(DatasetError) as info:
        train(cfg, out)  # the val split is checked before step 1, not at the final eval
    for needle in needles:
        assert needle in str(info.value)
    assert not out.exists()


def test_train_split_without_annotations_fails_naming_its_json(tmp_path):
    root = make_user_dataset(tmp_path / "mine")
    edit_json(root / "annotations" / "instances_train.json", _no_annotations)
    cfg = load_config(None, user_overrides(root, tmp_path))
    out = tmp_path / "run"
    with pytest.raises(DatasetError, match=r"instances_train\.json has no usable annotations.*data\.train_json"):
        train(cfg, out)  # not "cannot fit a mask codec" naming no file
    assert not out.exists()


def test_missing_image_names_the_image_folder_key(tmp_path):
    root = make_user_dataset(tmp_path / "mine")
    cfg = load_config(None, user_overrides(root, tmp_path))
    json_path, image_dir = root / "annotations" / "instances_val.json", root / "images" / "val"
    from istr.data.build import build_dataset

    coco = build_dataset(cfg.data, "val", train=False).coco
    (image_dir / "photo_val_2.jpg").unlink()
    with pytest.raises(DatasetError, match=r"photo_val_2\.jpg.*check data\.val_images or"):
        check_dataset(cfg.data, tmp_path / "cache")
    with pytest.raises(DatasetError, match=r"photo_val_2\.jpg.*does not exist; check data\.val_images or"):
        check_images(coco, json_path, image_dir, None, split="val")


def test_polygons_off_the_image_are_logged_once_per_split(tmp_path, caplog):
    root = make_user_dataset(tmp_path / "mine")

    def off_image(data: dict) -> None:
        data["annotations"][0]["segmentation"] = [[SIDE + 9, 10, SIDE + 20, 10, SIDE + 20, 30, SIDE + 9, 30]]
        data["annotations"][2]["segmentation"] = [[-5, 10, 30, 10, 30, 30, -5, 30]]

    edit_json(root / "annotations" / "instances_val.json", off_image)
    cfg = load_config(None, user_overrides(root, tmp_path))
    from istr.data.build import build_dataset

    with caplog.at_level("WARNING", logger="istr.data.checks"):
        check_dataset(cfg.data, tmp_path / "cache")
        build_dataset(cfg.data, "val", train=False)  # the loader validates the json again: no second warning
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1 and "instances_val.json: of 3 non-crowd annotations" in messages[0]
    assert "1 dropped: polygon entirely outside its image (annotation ids 101)" in messages[0]
    assert "1 clipped: polygon partly outside its image" in messages[0]


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_val_image_fails_before_step_one_naming_the_file(tmp_path, suffix):
    root = make_user_dataset(tmp_path / "mine")
    victim = root / "images" / "val" / "photo_val_3.jpg"
    if suffix == ".png":  # a PNG under the same record
        Image.open(victim).save(victim.with_suffix(".png"))
        edit_json(root / "annotations" / "instances_val.json",
                  lambda d: d["images"][2].update(file_name="photo_val_3.png"))
        victim = victim.with_suffix(".png")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    cfg = load_config(None, user_overrides(root, tmp_path))
    out = tmp_path / "run"
    with pytest.raises(DatasetError, match=rf"{victim.name} \(image id 3 in .*instances_val\.json\) cannot be decoded"):
        train(cfg, out)
    assert not out.exists()


def test_image_check_is_cached_until_a_file_changes(tmp_path):
    root = make_user_dataset(tmp_path / "mine")
    cfg = load_config(None, user_overrides(root, tmp_path))
    from istr.data.build import build_dataset

    coco = build_dataset(cfg.data, "val", train=False).coco
    json_path, image_dir = root / "annotations" / "instances_val.json", root / "images" / "val"
    assert check_images(coco, json_path, image_dir, tmp_path / "cache") is False
    assert check_images(coco, json_path, image_dir, tmp_path / "cache") is True
    victim = image_dir / "photo_val_1.jpg"
    victim.write_bytes(victim.read_bytes()[:100])  # other size: the cached pass no longer applies
    with pytest.raises(DatasetError, match="photo_val_1.jpg"):
        check_images(coco, json_path, image_dir, tmp_path / "cache")


@pytest.mark.parametrize(("override", "key", "valid"), [
    ("train.batch_size=0", "train.batch_size", ">= 1"),
    ("train.lr=-1e-3", "train.lr", "> 0"),
    ("train.lr=nan", "train.lr", "> 0"),
    ("data.flip_prob=1.5", "data.flip_prob", "[0, 1]"),
    ("model.num_queries=0", "model.num_queries", ">= 1"),
    ("loss.weight_mask=-1", "loss.weight_mask", ">= 0"),
    ("codec.dim=0", "codec.dim", "1 to 784"),
    ("codec.dim=10000", "codec.dim", "1 to 784"),
    ("data.train_short_sizes=[]", "data.train_short_sizes", "non-empty"),
    ("train.lr_step_fracs=[0.5,1.5]", "train.lr_step_fracs", "(0, 1]"),
])
def test_value_out_of_range_names_key_and_range(override, key, valid):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert key in str(info.value) and valid in str(info.value)


@pytest.mark.parametrize("override", ["train.batch_size=0", "train.lr=-1e-3"])
def test_bad_value_fails_the_cli_before_the_run_dir_is_made(tmp_path, capsys, override):
    out = tmp_path / "run"
    assert main(["train", "--config", str(REPO / "experiments" / "tiny.yaml"), "--out", str(out), override]) == 2
    assert override.split("=")[0] in capsys.readouterr().err
    assert not out.exists()


def test_finetune_schedule_scales_with_max_steps():
    cfg = load_config(REPO / "experiments" / "finetune.yaml", ["train.max_steps=200"])
    assert not cfg.data.synth.enabled
    assert schedule_steps(cfg.train) == (10, [160, 190])
    assert schedule_steps(load_config(None, ["train.warmup_steps=7", "train.lr_steps=[9]"]).train) == (7, [9])


def test_a_start_failing_after_the_checks_leaves_no_run_dir(tiny_cfg, tmp_path, monkeypatch):
    import istr.engine.train as train_module

    def broken_model(*args, **kwargs):
        raise RuntimeError("model build failed")

    monkeypatch.setattr(train_module, "build_model", broken_model)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="model build failed"):
        train(tiny_cfg, out)  # config.yaml, run.json and codec.pt were written by then
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError):
        train(tiny_cfg, empty)  # a folder the start did not create is not removed, only emptied again
    assert empty.is_dir() and not list(empty.iterdir())


def test_synth_on_generates_into_a_missing_folder_once_and_names_a_mistyped_json(tmp_path):
    root = tmp_path / "shapes"
    synth = ["data.synth.enabled=true", "data.synth.num_train=2", "data.synth.num_val=1", "data.synth.image_size=32"]
    cfg = load_config(None, user_overrides(root, tmp_path, *synth))
    ensure_dataset(cfg.data)
    generated = checksums(root)
    assert "annotations/instances_val.json" in generated and MARKER in generated
    ensure_dataset(cfg.data)  # complete and ours: reused as is
    assert checksums(root) == generated
    typo = load_config(None, user_overrides(root, tmp_path, *synth, "data.val_json=annotations/instances_vall.json"))
    with pytest.raises(DatasetError, match=r"data\.val_json names no file the generator writes"):
        ensure_dataset(typo.data)
    assert checksums(root) == generated


def test_processes_started_together_generate_the_dataset_once(tmp_path, monkeypatch):
    # Sweep cells and recipe variants start at once on one data.root; before the lock several generated
    # into it at the same time and others read half-written PNGs.
    import multiprocessing

    import istr.data.build as build

    root, calls = tmp_path / "shapes", tmp_path / "generations.txt"

    def counted(*args, **kwargs):
        with open(calls, "a") as handle:
            handle.write("generate\n")
        return generate_synthetic_coco(*args, **kwargs)

    monkeypatch.setattr(build, "generate_synthetic_coco", counted)  # forked children inherit the patch
    synth = ["data.synth.enabled=true", "data.synth.num_train=40", "data.synth.num_val=10", "data.synth.image_size=32"]
    cfg = load_config(None, user_overrides(root, tmp_path, *synth))
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(3)

    def start_together() -> None:
        barrier.wait()
        build.ensure_dataset(cfg.data)

    workers = [context.Process(target=start_together) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    assert calls.read_text().splitlines() == ["generate"]
    check_dataset(cfg.data, None)  # every image decodes
