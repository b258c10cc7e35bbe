"""The grid_sample and sparse poolers must give the same RoI features (and gradients) as torchvision's roi_align."""

import pytest
import torch

from istr.model.backbone import LEVEL_NAMES
from istr.model.pooler import POOLERS, assign_levels
from tests.conftest import make_model

STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}


def _inputs(box_scale: float, seed: int = 0, low: float = 20):
    """Features of a 256x256 image and 2x30 boxes from (low, low) onwards; low < 0 or box_scale > 230 leave the map."""
    generator = torch.Generator().manual_seed(seed)
    features = {
        n: torch.randn(2, 8, 256 // s, 256 // s, generator=generator, requires_grad=True) for n, s in STRIDES.items()
    }
    xy = torch.rand(2, 30, 2, generator=generator) * 100 + low
    wh = torch.rand(2, 30, 2, generator=generator) * box_scale + 4
    corner = xy + wh
    return features, torch.cat([xy, corner.clamp(max=230) if low >= 0 else corner], -1)


def _pool(name: str, sampling_ratio: int, box_scale: float, low: float = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """RoI tokens of ``pooler(pooler.prepare(features), boxes)`` and d sum(tokens^2) / d features (all levels)."""
    features, boxes = _inputs(box_scale, low=low)
    pooler = POOLERS[name](7, sampling_ratio)
    pooled = pooler(pooler.prepare(features), boxes)
    pooled.pow(2).sum().backward()
    grads = [torch.zeros_like(f).flatten() if f.grad is None else f.grad.flatten() for f in features.values()]
    return pooled, torch.cat(grads)


def test_level_rule_of_fpn():
    boxes = torch.tensor([[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 20, 20], [0, 0, 900, 900.0]])
    assert assign_levels(boxes).tolist() == [2, 1, 0, 3]


@pytest.mark.parametrize("name", ["grid_sample", "sparse", "auto"])
@pytest.mark.parametrize("box_scale", [10.0, 150.0], ids=["one-level", "all-levels"])
@pytest.mark.parametrize("sampling_ratio", [1, 2])
def test_fixed_ratio_poolers_match_roi_align(name, box_scale, sampling_ratio):
    """Inside the feature map both give RoIAlign's features and feature gradients (fp32, 1e-4 / 1e-3)."""
    expected, expected_grad = _pool("roi_align", sampling_ratio, box_scale)
    pooled, grad = _pool(name, sampling_ratio, box_scale)
    assert expected.shape == (60, 49, 8)
    torch.testing.assert_close(pooled, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("box_scale", [10.0, 150.0, 400.0], ids=["one-level", "all-levels", "past-the-map"])
@pytest.mark.parametrize("sampling_ratio", [1, 2])
def test_sparse_pooler_matches_grid_sample_everywhere(box_scale, sampling_ratio):
    """Boxes reaching past every border (where RoIAlign differs) too: sparse = grid_sample (fp32, 1e-5 / 1e-4)."""
    expected, expected_grad = _pool("grid_sample", sampling_ratio, box_scale, low=-40)
    pooled, grad = _pool("sparse", sampling_ratio, box_scale, low=-40)
    assert expected.abs().sum() > 0 and expected_grad.abs().sum() > 0
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)


def test_sparse_pooler_skips_levels_no_box_uses():
    """Every box on P2: P3-P5 are never flattened nor given a gradient; the model's image feature reaches them."""
    features, boxes = _inputs(10.0)
    pooler = POOLERS["sparse"](7, 2)
    prepared = pooler.prepare(features)
    pooler(prepared, boxes).sum().backward()
    assert features["p2"].grad.abs().sum() > 0
    assert all(features[name].grad is None for name in ("p3", "p4", "p5"))
    assert set(prepared._pixels) == {(0,)}


@pytest.mark.parametrize("name", sorted(POOLERS))
def test_poolers_run_under_bf16_autocast_with_boxes_on_several_levels(name):
    # Under autocast grid_sample runs in float32 while the features are bf16; the multi-level packing must
    # accept either (a GPU sweep cell crashed here on the first batch whose boxes spanned two levels).
    features, boxes = _inputs(150.0)
    features = {n: f.detach().bfloat16() for n, f in features.items()}
    pooler = POOLERS[name](7, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = pooler(pooler.prepare(features), boxes)
    assert pooled.shape == (60, 49, 8) and torch.isfinite(pooled.float()).all()


def test_auto_pooler_is_sparse_on_the_cpu_and_grid_sample_on_other_devices():
    features, boxes = _inputs(150.0)
    pooler = POOLERS["auto"](7, 2)
    assert pooler.prepare(features)[0] is pooler.cpu_pooler
    torch.testing.assert_close(pooler(pooler.prepare(features), boxes), _pool("sparse", 2, 150.0)[0], rtol=0, atol=0)
    on_device = {name: f.detach().to("meta") for name, f in features.items()}  # stands in for CUDA
    assert pooler.prepare(on_device)[0] is pooler.device_pooler


@pytest.mark.parametrize("name", sorted(POOLERS))
def test_bf16_features_are_pooled_at_fp32_box_coordinates(name, tiny_cfg):
    """Under CPU bf16 autocast the model hands the pooler fp32 boxes, and every pooler samples at them: its RoI
    features stay within bf16 rounding of the fp32 pooling (measured 0.006 on unit-variance features; boxes
    rounded to bf16 move the sampling points by up to 0.5 px and gave 0.08-0.14)."""
    gen = torch.Generator().manual_seed(0)
    features = {n: torch.randn(2, 16, 96 // STRIDES[n], 96 // STRIDES[n], generator=gen) for n in LEVEL_NAMES}
    boxes = torch.tensor([[[10.3, 12.7, 50.1, 60.9], [0.5, 1.5, 90.2, 95.0]]] * 2)
    pooler = POOLERS[name](7, 2)
    expected = pooler(pooler.prepare(features), boxes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = pooler(pooler.prepare({n: f.bfloat16() for n, f in features.items()}), boxes)
    assert (bf16.float() - expected).abs().max() < 0.02

    model = make_model(tiny_cfg, pooler=name)
    seen = []
    model.pooler.register_forward_pre_hook(lambda module, args: seen.append(args[1].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), torch.tensor([[64, 64], [64, 48]]))
    assert seen == [torch.float32] * len(model.stages)
