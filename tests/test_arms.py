"""Every arm of the four ablation axes (docs/method.md#ablations) changes what is computed, and trains.

The unit tests compare each arm with its axis' default arm on the same inputs: a different
reconstruction (codec), cost matrix (mask cost), loss value (mask loss) or parameter count
(attention). The slow tests train each arm end to end with ``istr train``, and a throwaway mask
loss registered at test time, to show that a new arm is one function plus one registry line.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from istr.cli import main
from istr.codecs import CODECS, build_codec
from istr.config import Config, to_yaml
from istr.engine.train import check_arms, train
from istr.losses import MASK_LOSSES, MaskTerm, SetCriterion, loss_weights, weighted_sum
from istr.matcher import MASK_COSTS, HungarianMatcher
from istr.model.head import ATTENTIONS
from istr.registry import UnknownArmError

from .conftest import batch_targets, make_model, num_params, random_stage, rect_masks

pytestmark = pytest.mark.usefixtures("one_thread")

DEFAULTS = Config()
ARMS = [
    *[("codec.type", name) for name in CODECS],
    *[("matcher.mask_cost", name) for name in MASK_COSTS],
    *[("loss.mask", name) for name in MASK_LOSSES],
    *[("model.attention", name) for name in ATTENTIONS],
]
CODEC_PARAMS = {"ae": {"epochs": 2}}




@pytest.fixture(scope="module")
def pca():
    codec = build_codec("pca", 8)
    codec.fit(rect_masks(64))
    return codec


@pytest.mark.parametrize("arm", [a for a in CODECS if a != DEFAULTS.codec.type])
def test_codec_arm_changes_the_reconstruction(pca, arm):
    torch.manual_seed(0)
    codec = build_codec(arm, 8, **CODEC_PARAMS.get(arm, {}))
    codec.fit(rect_masks(64))
    held_out = rect_masks(8, seed=1)
    assert not torch.allclose(codec.decode(codec.encode(held_out)), pca.decode(pca.encode(held_out)), atol=1e-3)


@pytest.mark.parametrize("arm", [a for a in MASK_COSTS if a != DEFAULTS.matcher.mask_cost])
def test_mask_cost_arm_changes_the_cost_matrix(pca, arm):
    target = batch_targets(pca, [2, 1])
    stage = random_stage(2, 4, pca.dim, torch.Generator().manual_seed(0))
    pred = {k: v.flatten(0, 1) for k, v in stage.items()}
    pred["boxes_norm"] = pred["boxes"] / 64.0
    default = HungarianMatcher(pca, DEFAULTS.matcher.mask_cost).cost_matrix(pred, target)
    assert not torch.allclose(HungarianMatcher(pca, arm).cost_matrix(pred, target), default)


@pytest.mark.parametrize("arm", [a for a in MASK_LOSSES if a != DEFAULTS.loss.mask])
def test_mask_loss_arm_changes_the_loss(pca, arm):
    target = batch_targets(pca, [2, 1])
    outputs = {**random_stage(2, 4, pca.dim, torch.Generator().manual_seed(0)), "aux": []}
    weights = loss_weights(DEFAULTS.loss)

    def total(mask_loss: str) -> float:
        return weighted_sum(SetCriterion(HungarianMatcher(pca), pca, mask_loss)(outputs, target), weights).item()

    assert total(arm) != pytest.approx(total(DEFAULTS.loss.mask), rel=1e-4)


@pytest.mark.parametrize("arm", [a for a in ATTENTIONS if a != DEFAULTS.model.attention])
def test_attention_arm_changes_the_parameter_count(tiny_cfg, arm):
    assert num_params(make_model(tiny_cfg, attention=arm)) != num_params(make_model(tiny_cfg))


@pytest.mark.parametrize("key", ["codec.type", "matcher.mask_cost", "loss.mask", "model.attention"])
def test_unknown_arm_fails_before_training_and_lists_valid_names(tiny_cfg_factory, tmp_path, key):
    section, field = key.split(".")
    cfg = tiny_cfg_factory()
    setattr(getattr(cfg, section), field, "nonsense")
    with pytest.raises(UnknownArmError, match=rf"{key}='nonsense' is not a known arm; valid: \w+"):
        check_arms(cfg)
    run_dir = tmp_path / "run"
    with pytest.raises(UnknownArmError):
        train(cfg, run_dir)
    assert not run_dir.exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("key", "arm"), ARMS, ids=[f"{k}={v}" for k, v in ARMS])
def test_every_arm_trains_and_evaluates(tiny_cfg, tmp_path, key, arm):
    config = tmp_path / "tiny.yaml"
    config.write_text(to_yaml(tiny_cfg))
    run_dir = tmp_path / "run"
    overrides = ["train.max_steps=3", f"{key}={arm}", "codec.params={epochs: 2}" if arm == "ae" else "seed=0"]
    assert main(["train", "--config", str(config), "--out", str(run_dir), *overrides]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert set(json.loads((run_dir / "eval.json").read_text())) == {"bbox", "segm"}


def _smooth_l1(codes, target_codes, target_masks, codec, num_boxes):
    return torch.nn.functional.smooth_l1_loss(codes, target_codes, reduction="sum") / num_boxes


@pytest.mark.slow
def test_a_registered_throwaway_mask_loss_trains_and_is_logged(tiny_cfg, tmp_path, monkeypatch):
    # One function + one registry line; the name contains "_s" on purpose: the stage filter must keep it.
    monkeypatch.setitem(MASK_LOSSES, "smooth", {"loss_mask_smooth": MaskTerm(_smooth_l1, "weight_l1")})
    cfg = dataclasses.replace(tiny_cfg, loss=dataclasses.replace(tiny_cfg.loss, mask="smooth"))
    cfg.train.max_steps = 1
    train(cfg, tmp_path / "run")
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["loss_mask_smooth"] > 0
    assert not any(k.startswith("loss_mask_smooth_s") or k in ("loss_mask_l2", "loss_mask_dice") for k in row)
    assert loss_weights(cfg.loss)["loss_mask_smooth"] == cfg.loss.weight_l1
