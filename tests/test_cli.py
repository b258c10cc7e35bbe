"""The ``istr`` command line: synth, fit-codec, train, eval, predict, quickstart, and its error messages."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from istr.cli import main
from istr.config import to_yaml


def test_synth_writes_coco_dataset(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "d"), "--train", "3", "--val", "2", "--size", "64"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"]["images"] == 3
    data = json.loads((tmp_path / "d" / "annotations" / "instances_val.json").read_text())
    assert len(data["images"]) == 2 and len(data["categories"]) >= 6


def test_unknown_key_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--config", "experiments/tiny.yaml", "model.num_querys=3", "--out", str(tmp_path)]) == 2
    assert "did you mean 'model.num_queries'" in capsys.readouterr().err


@pytest.mark.slow
def test_train_eval_predict_quickstart(tiny_cfg, synth_root, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(to_yaml(tiny_cfg))
    run_dir = tmp_path / "run"
    assert main(["fit-codec", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["mask_iou"] > 0.5
    assert main(["train", "--config", str(config), "--out", str(run_dir), "train.max_steps=2"]) == 0
    (run_dir / "eval.json").unlink()
    assert main(["eval", "--run", str(run_dir)]) == 0
    assert set(json.loads((run_dir / "eval.json").read_text())) == {"bbox", "segm"}

    image = sorted((synth_root / "images" / "val").glob("*.png"))[0]
    assert main(["predict", "--run", str(run_dir), str(image), "--out", str(tmp_path / "pred"),
                 "--score-threshold", "0"]) == 0
    overlay = Image.open(tmp_path / "pred" / f"{image.stem}_pred.png")
    width, height = Image.open(image).size
    assert overlay.size[0] % width == 0 and overlay.size[0] // width == overlay.size[1] // height

    assert main(["quickstart", "--config", str(config), "--out", str(tmp_path / "results"), "train.max_steps=2"]) == 0
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert "| segm |" in summary and len(list((tmp_path / "results" / "predictions").glob("*.png"))) == 4
