"""Every arm of the four ablation axes (ISTR_SPEC §7) trains with the same ``istr train`` command."""

from __future__ import annotations

import json

import pytest

from istr.cli import main
from istr.codecs import CODECS
from istr.config import to_yaml
from istr.losses import MASK_LOSSES
from istr.matcher import MASK_COSTS
from istr.model.head import ATTENTIONS

pytestmark = pytest.mark.slow

ARMS = [
    *[("codec.type", name) for name in CODECS],
    *[("matcher.mask_cost", name) for name in MASK_COSTS],
    *[("loss.mask", name) for name in MASK_LOSSES],
    *[("model.attention", name) for name in ATTENTIONS],
]


def test_registries_hold_the_papers_arms():
    assert set(CODECS) == {"pca", "dct", "sparse", "ae"}
    assert set(MASK_COSTS) == {"cosine", "l2", "dice", "none"}
    assert set(MASK_LOSSES) == {"l2+dice", "l2", "dice"}
    assert set(ATTENTIONS) == {"self+dynamic", "self", "dynamic"}


@pytest.mark.parametrize(("key", "arm"), ARMS, ids=[f"{k}={v}" for k, v in ARMS])
def test_every_arm_trains_and_evaluates(tiny_cfg, tmp_path, key, arm):
    config = tmp_path / "tiny.yaml"
    config.write_text(to_yaml(tiny_cfg))
    run_dir = tmp_path / "run"
    overrides = ["train.max_steps=3", f"{key}={arm}", "codec.params={epochs: 2}" if arm == "ae" else "seed=0"]
    assert main(["train", "--config", str(config), "--out", str(run_dir), *overrides]) == 0
    resolved = (run_dir / "config.yaml").read_text()
    assert f"{key.split('.')[1]}: {arm}" in resolved
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    eval_json = json.loads((run_dir / "eval.json").read_text())
    assert set(eval_json) == {"bbox", "segm"}
