"""The grid_sample pooler must give the same RoI features (and gradients) as torchvision's roi_align."""

import pytest
import torch

from istr.model.pooler import POOLERS, assign_levels

STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}


def _inputs(box_scale: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = {
        n: torch.randn(2, 8, 256 // s, 256 // s, generator=generator, requires_grad=True) for n, s in STRIDES.items()
    }
    xy = torch.rand(2, 30, 2, generator=generator) * 100 + 20
    wh = torch.rand(2, 30, 2, generator=generator) * box_scale + 4
    return features, torch.cat([xy, (xy + wh).clamp(max=230)], -1)


def test_level_rule_of_fpn():
    boxes = torch.tensor([[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 20, 20], [0, 0, 900, 900.0]])
    assert assign_levels(boxes).tolist() == [2, 1, 0, 3]


@pytest.mark.parametrize("box_scale", [10.0, 150.0], ids=["one-level", "all-levels"])
@pytest.mark.parametrize("sampling_ratio", [1, 2])
def test_grid_sample_matches_roi_align(box_scale, sampling_ratio):
    outputs, grads = [], []
    for name in ("roi_align", "grid_sample"):
        features, boxes = _inputs(box_scale)
        pooled = POOLERS[name](7, sampling_ratio)(features, boxes)
        pooled.pow(2).sum().backward()
        outputs.append(pooled)
        grads.append(
            torch.cat(
                [torch.zeros_like(f).flatten() if f.grad is None else f.grad.flatten() for f in features.values()]
            )
        )
    assert outputs[0].shape == (60, 49, 8)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", sorted(POOLERS))
def test_poolers_run_under_bf16_autocast_with_boxes_on_several_levels(name):
    # Under autocast grid_sample runs in float32 while the features are bf16; the multi-level packing must
    # accept either (a GPU sweep cell crashed here on the first batch whose boxes spanned two levels).
    features, boxes = _inputs(150.0)
    features = {n: f.detach().bfloat16() for n, f in features.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = POOLERS[name](7, 2)(features, boxes)
    assert pooled.shape == (60, 49, 8) and torch.isfinite(pooled.float()).all()
