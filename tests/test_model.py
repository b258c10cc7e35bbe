"""Tests of the ISTR model (docs/method.md#architecture).

Uses the tiny config of conftest.py: resnet18, hidden_dim d = 32, dynamic_dim 8, k = 8 queries,
2 stages, codec dim 16.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torchvision.models import resnet18
from torchvision.ops import FrozenBatchNorm2d

from istr.model import ISTR
from istr.model.backbone import BackboneFPN
from istr.model.cpu_ops import ELU
from istr.model.head import ATTENTIONS, DynamicConv, QuerySelfAttention, StaticConv, apply_deltas

from .conftest import CODE_DIM, NUM_CLASSES, make_model, num_params

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE_SIZES = torch.tensor([[64, 64], [48, 64]])  # (h, w); image 1 is padded at the bottom


def run_images() -> torch.Tensor:
    return torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def run(model: ISTR) -> dict:
    return model(run_images(), IMAGE_SIZES)


def assert_stage_shapes(out: dict, k: int) -> None:
    assert out["logits"].shape == (2, k, NUM_CLASSES)
    assert out["boxes"].shape == (2, k, 4)
    assert out["codes"].shape == (2, k, CODE_DIM)
    assert all(torch.isfinite(out[key]).all() for key in ("logits", "boxes", "codes"))


# ---------------------------------------------------------------------------- output contract


@pytest.mark.parametrize(("attention", "num_stages"), [(name, 2) for name in ATTENTIONS] + [("self+dynamic", 3)])
def test_output_shapes(tiny_cfg, attention, num_stages):
    out = run(make_model(tiny_cfg, attention=attention, num_stages=num_stages))
    k = tiny_cfg.model.num_queries
    assert set(out) == {"logits", "boxes", "codes", "aux"}
    assert_stage_shapes(out, k)
    assert len(out["aux"]) == num_stages - 1
    for stage in out["aux"]:
        assert set(stage) == {"logits", "boxes", "codes"}
        assert_stage_shapes(stage, k)


def test_initial_boxes_cover_the_whole_image(tiny_cfg):
    model = make_model(tiny_cfg)
    k = tiny_cfg.model.num_queries
    boxes = model.initial_boxes(torch.tensor([[64, 48], [32, 64]]))
    expected = torch.tensor([[0.0, 0.0, 48.0, 64.0], [0.0, 0.0, 64.0, 32.0]])[:, None].expand(2, k, 4)
    torch.testing.assert_close(boxes, expected)
    # box_deltas start at zero, so stage 0 returns its input boxes: the whole (unpadded) image.
    stage0 = run(model)["aux"][0]["boxes"]
    whole = torch.tensor([[0.0, 0.0, 64.0, 64.0], [0.0, 0.0, 64.0, 48.0]])
    torch.testing.assert_close(stage0, whole[:, None].expand(2, k, 4))


def test_initial_class_logits_use_the_prior(tiny_cfg):
    out = run(make_model(tiny_cfg))
    # class_logits bias = -log((1 - 0.01) / 0.01); the weight term is small at init.
    assert out["aux"][0]["logits"].sigmoid().mean().item() == pytest.approx(0.01, abs=0.01)


def test_boxes_are_detached_between_stages(tiny_cfg):
    model = make_model(tiny_cfg)
    # box_deltas start at zero, which would hide every path into the box heads; make them live.
    for stage in model.stages:
        torch.nn.init.normal_(stage.box_deltas.weight, std=0.1)
    run(model)["boxes"].sum().backward()
    first, last = model.stages[0], model.stages[-1]
    # The final boxes depend on stage 0's queries (so the graph reaches stage 0) ...
    assert first.ffn[0].weight.grad is not None and first.ffn[0].weight.grad.abs().sum() > 0
    # ... but not on stage 0's box prediction.
    for param in (*first.box_deltas.parameters(), *first.reg_tower.parameters()):
        assert param.grad is None or param.grad.abs().sum() == 0
    assert last.box_deltas.bias.grad is not None and last.box_deltas.bias.grad.abs().sum() > 0


def test_roi_pooling_does_not_depend_on_the_first_batch(tiny_cfg):
    model = make_model(tiny_cfg).eval()
    fresh = copy.deepcopy(model)
    landscape = torch.tensor([[43, 64], [40, 64]])  # e.g. COCO 640x427 at max size 64, padded to 64x64
    with torch.no_grad():
        model(torch.zeros(2, 3, 64, 64), IMAGE_SIZES)  # first call with full-height images
        expected = model(run_images(), landscape)
        got = fresh(run_images(), landscape)  # first call with short images
    torch.testing.assert_close(got["logits"], expected["logits"])


# ---------------------------------------------------------------------------- attention variants


def test_attention_variants_structure(tiny_cfg):
    for stage in make_model(tiny_cfg, attention="self+dynamic").stages:
        assert isinstance(stage.query_attention, QuerySelfAttention) and type(stage.interaction) is DynamicConv
        assert hasattr(stage.interaction, "dynamic_layer")
    for stage in make_model(tiny_cfg, attention="self").stages:
        assert isinstance(stage.query_attention, QuerySelfAttention) and type(stage.interaction) is StaticConv
        assert not hasattr(stage.interaction, "dynamic_layer")  # never built: nothing is made and then deleted
        assert stage.interaction.first.shape == (32, 8) and stage.interaction.second.shape == (8, 32)
    for stage in make_model(tiny_cfg, attention="dynamic").stages:
        assert stage.query_attention is None
        assert type(stage.interaction) is DynamicConv


def test_a_checkpoint_from_before_the_query_attention_module_loads(tiny_cfg):
    """Its self-attention and norm were the stage's ``self_attn`` and ``norm_attn``: renamed on load."""
    model = make_model(tiny_cfg, attention="self+dynamic")
    renamed = {k.replace("query_attention.attn.", "self_attn.").replace("query_attention.norm.", "norm_attn."): v
               for k, v in model.state_dict().items()}  # fmt: skip
    assert any(".self_attn." in k for k in renamed) and any(".norm_attn." in k for k in renamed)
    fresh = make_model(tiny_cfg, attention="self+dynamic")
    fresh.load_state_dict(renamed)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())


def test_attention_variants_parameter_counts(tiny_cfg):
    d, dd, stages = 32, 8, 2
    assert (tiny_cfg.model.hidden_dim, tiny_cfg.model.dynamic_dim, tiny_cfg.model.num_stages) == (d, dd, stages)
    counts = {name: num_params(make_model(tiny_cfg, attention=name)) for name in ATTENTIONS}
    # "self": dynamic_layer Linear(d, 2*d*dd) (2*32*32*8 + 2*32*8 = 16896) becomes first + second
    # (2*32*8 = 512): 16384 fewer per stage.
    assert counts["self+dynamic"] - counts["self"] == stages * 16384 == stages * 2 * d * d * dd
    # "dynamic": no MultiheadAttention (in_proj 3d*d + 3d, out_proj d*d + d = 4224) and no
    # LayerNorm (2d = 64): 4288 fewer per stage.
    assert counts["self+dynamic"] - counts["dynamic"] == stages * 4288 == stages * (4 * d * d + 6 * d)


def test_unknown_attention_raises(tiny_cfg):
    with pytest.raises(ValueError, match="valid: self\\+dynamic, self, dynamic"):
        make_model(tiny_cfg, attention="cross")


# ---------------------------------------------------------------------------- box deltas


def test_apply_deltas_zero_is_identity():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 64.0, 48.0]])
    torch.testing.assert_close(apply_deltas(torch.zeros(2, 4), boxes), boxes)


def test_apply_deltas_hand_computed():
    # Box w=20, h=40 centred at (20, 40). Weights (2, 2, 1, 1): dx = 2/2 -> cx + 1*20 = 40,
    # dy = -2/2 -> cy - 1*40 = 0, dw = ln 2 -> w = 40, dh = 0 -> h = 40.
    box = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    deltas = torch.tensor([[2.0, -2.0, math.log(2), 0.0]])
    torch.testing.assert_close(apply_deltas(deltas, box), torch.tensor([[20.0, -20.0, 60.0, 20.0]]))


def test_apply_deltas_clamps_scale():
    # dw is clamped at log(1000/16): a 16-wide box grows to at most 1000 wide.
    box = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    out = apply_deltas(torch.tensor([[0.0, 0.0, 100.0, 0.0]]), box)
    torch.testing.assert_close(out, torch.tensor([[8.0 - 500.0, 0.0, 8.0 + 500.0, 16.0]]))


# ---------------------------------------------------------------------------- backbone


def test_unknown_backbone_and_norm_raise():
    with pytest.raises(ValueError, match="resnet18"):
        BackboneFPN("resnet5", 32)
    with pytest.raises(ValueError, match="frozen_bn"):
        BackboneFPN("resnet18", 32, norm="group")


def test_backbone_levels(tiny_cfg):
    features = BackboneFPN("resnet18", 32, norm="bn")(torch.zeros(1, 3, 64, 96))
    assert list(features) == ["p2", "p3", "p4", "p5"]
    assert [tuple(f.shape) for f in features.values()] == [(1, 32, 64 // s, 96 // s) for s in (4, 8, 16, 32)]


def test_missing_pretrained_file_is_never_downloaded(tmp_path):
    path = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError, match="never downloaded") as info:
        BackboneFPN("resnet18", 32, weights=path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("wrap", [False, True], ids=["state_dict", "model_key"])
def test_loads_local_resnet18_weights(tmp_path, wrap):
    torch.manual_seed(1)
    state = resnet18(weights=None).state_dict()
    path = tmp_path / "r18.pth"
    torch.save({"model": state} if wrap else state, path)
    backbone = BackboneFPN("resnet18", 32, weights=path)
    body = backbone.body
    torch.testing.assert_close(body.conv1.weight, state["conv1.weight"])
    torch.testing.assert_close(body.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    torch.testing.assert_close(body.layer2[0].bn1.running_var, state["layer2.0.bn1.running_var"])
    assert not body.conv1.weight.requires_grad and not any(p.requires_grad for p in body.bn1.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())  # freeze_at=2, as detectron2
    assert body.layer2[0].conv1.weight.requires_grad


def test_freeze_at_fixes_batchnorm_statistics_too(tmp_path):
    path = tmp_path / "backbone.pt"
    torch.save(BackboneFPN("resnet18", 32, norm="bn").state_dict(), path)
    backbone = BackboneFPN("resnet18", 32, norm="bn", weights=path, freeze_at=2).train()
    before = backbone.body.layer1[0].bn1.running_mean.clone()
    backbone(torch.rand(2, 3, 64, 64) * 255)
    torch.testing.assert_close(backbone.body.layer1[0].bn1.running_mean, before)
    assert isinstance(backbone.body.bn1, FrozenBatchNorm2d)
    assert isinstance(backbone.body.layer2[0].bn1, torch.nn.BatchNorm2d)
    trainable = BackboneFPN("resnet18", 32, norm="bn", weights=path, freeze_at=0)
    assert all(p.requires_grad for p in trainable.parameters())


def test_weights_matching_nothing_are_rejected(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="no weights matching"):
        BackboneFPN("resnet18", 32, weights=path)


def test_initial_queries_add_the_image_feature_to_the_query_embedding(tiny_cfg):
    """Reference query init: learnable embedding + sum over P2-P5 of each level's average over the image.

    The average leaves out the padding: image 1 (48 of 64 rows) averages the first ceil(48 / stride) rows;
    the padding itself reads 0 after the pixel normalisation.
    """
    model = make_model(tiny_cfg).eval()
    seen = {}
    stage0 = model.stages[0]
    original = stage0.forward
    stage0.forward = lambda queries, rois, boxes: seen.setdefault("q", queries) is not None and original(
        queries, rois, boxes)
    images = run_images()
    with torch.no_grad():
        model(images, IMAGE_SIZES)
        x = (images.float() - model.pixel_mean) / model.pixel_std
        for image, (h, w) in zip(x, IMAGE_SIZES.tolist()):
            image[:, h:], image[:, :, w:] = 0, 0  # padding reads 0 after the normalisation
        features = model.backbone(x).values()
    cells = [[(-(-h // stride), -(-w // stride)) for h, w in IMAGE_SIZES.tolist()] for stride in model.backbone.strides]
    expected = sum(
        torch.stack([image[:, :rows, :cols].mean(dim=(1, 2)) for image, (rows, cols) in zip(level, level_cells)])
        for level, level_cells in zip(features, cells)
    )
    torch.testing.assert_close(seen["q"], model.query_features.weight[None] + expected[:, None, :])
    assert not torch.allclose(seen["q"][0], seen["q"][1])  # two images start from different queries


def test_class_and_box_towers_are_three_linear_ln_elu_blocks(tiny_cfg):
    stage = make_model(tiny_cfg).stages[0]
    for tower in (stage.cls_tower, stage.reg_tower, stage.mask_tower):
        kinds = [type(m) for m in tower]
        assert kinds == [torch.nn.Linear, torch.nn.LayerNorm, ELU] * 3
    one = make_model(tiny_cfg, head_layers=1).stages[0]
    assert sum(p.numel() for p in one.parameters()) < sum(p.numel() for p in stage.parameters())


def test_loads_a_whole_backbone_fpn_state_dict(tmp_path):
    torch.manual_seed(2)
    source = BackboneFPN("resnet18", 32, norm="bn")
    path = tmp_path / "backbone.pt"
    torch.save(source.state_dict(), path)
    loaded = BackboneFPN("resnet18", 32, norm="bn", weights=path)
    torch.testing.assert_close(loaded.fpn.inner_blocks[0][0].weight, source.fpn.inner_blocks[0][0].weight)
    torch.testing.assert_close(loaded.body.layer3[0].conv1.weight, source.body.layer3[0].conv1.weight)
