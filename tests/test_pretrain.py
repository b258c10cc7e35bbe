"""``model.pretrained=auto``: the project's own backbone, pretrained once on generated shapes and cached."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from istr.engine.pretrain import cache_path, resolve_backbone_weights, semantic_targets
from istr.model.backbone import BackboneFPN

pytestmark = pytest.mark.usefixtures("one_thread")

PRETRAIN = ["model.pretrained=auto", "pretrain.steps=3", "pretrain.num_images=8", "pretrain.batch_size=4",
            "data.synth.image_size=64"]


def test_semantic_targets_paint_each_mask_with_its_label_plus_one():
    masks = torch.zeros(2, 4, 5, dtype=torch.uint8)
    masks[0, :2, :2] = 1
    masks[1, 3, 4] = 1
    out = semantic_targets([{"masks": masks, "labels": torch.tensor([0, 6])}], 8, 8)
    assert out.shape == (1, 8, 8)
    assert (out[0, :2, :2] == 1).all() and out[0, 3, 4] == 7
    assert out.sum() == 4 * 1 + 7  # everything else, padding included, is background


def test_pretrain_once_then_reuse_the_cache_without_touching_the_callers_rng(tiny_cfg_factory, capsys):
    cfg = tiny_cfg_factory(*PRETRAIN)
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    path = resolve_backbone_weights(cfg)
    torch.testing.assert_close(torch.rand(3), expected_next)  # run init must not depend on the cache
    assert path == cache_path(cfg) and path.is_file() and path.with_suffix(".json").is_file()
    assert "one-time cost" in capsys.readouterr().out
    stamp = path.stat().st_mtime_ns
    assert resolve_backbone_weights(cfg) == path and path.stat().st_mtime_ns == stamp  # reused, not retrained
    assert "pretraining" not in capsys.readouterr().out
    state = torch.load(path, weights_only=True)
    backbone = BackboneFPN("resnet18", 32, norm="bn", weights=path)
    torch.testing.assert_close(backbone.fpn.layer_blocks[0][0].weight, state["fpn.layer_blocks.0.0.weight"])
    assert not torch.equal(state["fpn.layer_blocks.0.0.weight"],
                           BackboneFPN("resnet18", 32, norm="bn").fpn.layer_blocks[0][0].weight)


def test_cache_key_follows_what_shapes_the_weights(tiny_cfg_factory):
    base = cache_path(tiny_cfg_factory(*PRETRAIN))
    assert cache_path(tiny_cfg_factory(*PRETRAIN, "pretrain.steps=4")) != base
    assert cache_path(tiny_cfg_factory(*PRETRAIN, "model.hidden_dim=16")) != base
    assert cache_path(tiny_cfg_factory(*PRETRAIN, "seed=7")) == base  # one backbone for every ablation seed
    assert cache_path(tiny_cfg_factory(*PRETRAIN, "codec.dim=8")) == base


def test_pretrained_values(tiny_cfg_factory, tmp_path):
    assert resolve_backbone_weights(tiny_cfg_factory("model.pretrained=none")) is None
    weights = tmp_path / "r18.pth"
    assert resolve_backbone_weights(tiny_cfg_factory(f"model.pretrained={weights}")) == Path(weights)
    with pytest.raises(FileNotFoundError, match="pretrain-backbone"):
        resolve_backbone_weights(tiny_cfg_factory(*PRETRAIN), build=False)
