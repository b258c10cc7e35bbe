"""Tests of the Hungarian matcher (docs/method.md#matching-cost).

Every pairwise cost is checked on 2 predictions x 2 GT instances against numbers worked out by
hand; the assignment against a hand-solved 3x2 problem where the greedy choice is wrong; batching
(images, stages) against matching each piece alone.
"""

from __future__ import annotations

import math

import pytest
import torch

from istr.codecs import DCTCodec
from istr.codecs.base import MASK_EPS
from istr.matcher import (
    MASK_COSTS,
    HungarianMatcher,
    cosine_mask_cost,
    dice_mask_cost,
    focal_class_cost,
    giou_box_cost,
    l1_box_cost,
    l2_mask_cost,
    no_mask_cost,
)
from istr.targets import BatchTargets

SIZE = 28


def make_targets(
    sizes: list[int],
    labels: list[int] | None = None,
    boxes: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    image_hw: tuple[int, int] = (100, 100),
    dim: int = 2,
) -> BatchTargets:
    """A BatchTargets built by hand (no cropping/encoding), all images of size ``image_hw``."""
    m = sum(sizes)
    h, w = image_hw
    boxes = torch.zeros((m, 4)) if boxes is None else boxes.float()
    image_scale = torch.tensor([[w, h, w, h]], dtype=torch.float32).expand(len(sizes), 4)
    return BatchTargets(
        labels=torch.zeros(m, dtype=torch.int64) if labels is None else torch.tensor(labels, dtype=torch.int64),
        boxes=boxes,
        boxes_norm=boxes / torch.tensor([w, h, w, h], dtype=torch.float32),
        masks=torch.zeros((m, SIZE, SIZE)) if masks is None else masks,
        codes=torch.zeros((m, dim)) if codes is None else codes.float(),
        sizes=list(sizes),
        image_scale=image_scale.contiguous(),
        num_boxes=max(float(m), 1.0),
    )


def random_boxes(n: int, gen: torch.Generator, extent: float = 100.0) -> torch.Tensor:
    xy = torch.rand((n, 2), generator=gen) * extent * 0.7
    wh = torch.rand((n, 2), generator=gen) * extent * 0.3 + 1.0
    return torch.cat([xy, xy + wh], dim=1)


def random_outputs(batch: int, k: int, num_classes: int, dim: int, gen: torch.Generator) -> dict:
    return {
        "logits": torch.randn((batch, k, num_classes), generator=gen),
        "boxes": random_boxes(batch * k, gen).view(batch, k, 4),
        "codes": torch.randn((batch, k, dim), generator=gen),
    }


def random_targets(sizes: list[int], num_classes: int, dim: int, gen: torch.Generator) -> BatchTargets:
    m = sum(sizes)
    labels = torch.randint(0, num_classes, (m,), generator=gen).tolist()
    return make_targets(sizes, labels, random_boxes(m, gen), torch.randn((m, dim), generator=gen), dim=dim)


def as_lists(indices: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[list[int], list[int]]]:
    return [(rows.tolist(), cols.tolist()) for rows, cols in indices]


def half_masks() -> tuple[torch.Tensor, torch.Tensor]:
    """A left-half and a top-half 28x28 mask (392 pixels each, 196 shared)."""
    left = torch.zeros((SIZE, SIZE))
    left[:, : SIZE // 2] = 1
    top = torch.zeros((SIZE, SIZE))
    top[: SIZE // 2] = 1
    return left, top


# ---------------------------------------------------------------------------- cost functions


def focal_cost_by_hand(p: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    pos = alpha * (1 - p) ** gamma * -math.log(p)
    neg = (1 - alpha) * p**gamma * -math.log(1 - p)
    return pos - neg


def test_focal_class_cost_hand_computed():
    # Logits 0, ln 3, -ln 3 are probabilities 1/2, 3/4, 1/4.
    logits = torch.tensor([[0.0, math.log(3), -5.0], [-math.log(3), 2.0, 0.0]])
    cost = focal_class_cost({"logits": logits}, make_targets([2], labels=[1, 0]))
    # Column j reads the probability of GT j's class: GT0 is class 1, GT1 is class 0.
    expected = torch.tensor(
        [
            [focal_cost_by_hand(0.75), focal_cost_by_hand(0.5)],
            [focal_cost_by_hand(1 / (1 + math.exp(-2.0))), focal_cost_by_hand(0.25)],
        ]
    )
    assert cost.shape == (2, 2)
    torch.testing.assert_close(cost, expected, atol=1e-6, rtol=1e-5)
    # p = 1/2: 0.25 * 0.25 * ln2 - 0.75 * 0.25 * ln2 = -ln2 / 8.
    assert cost[0, 1].item() == pytest.approx(-math.log(2) / 8, abs=1e-6)
    # A confident right class is cheaper than an unsure one.
    assert cost[1, 0] < cost[0, 1] < cost[1, 1]


def test_l1_box_cost_on_normalised_boxes():
    pred = {"boxes_norm": torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])}
    target = make_targets([2], boxes=torch.tensor([[0.0, 0.0, 50.0, 50.0], [25.0, 25.0, 75.0, 75.0]]))
    expected = torch.tensor([[0.0, 1.0], [2.0, 1.0]])
    torch.testing.assert_close(l1_box_cost(pred, target), expected)


def test_giou_box_cost_is_negative_giou():
    pred = {"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0]])}
    target = make_targets([2], boxes=torch.tensor([[0.0, 0.0, 2.0, 2.0], [2.0, 2.0, 4.0, 4.0]]))
    # Overlap 1, union 7, hull 9: GIoU = 1/7 - 2/9 = -5/63. Disjoint 2x2 boxes in a 4x4 hull: 0 - 8/16.
    expected = torch.tensor([[-1.0, 0.5], [5 / 63, 5 / 63]])
    torch.testing.assert_close(giou_box_cost(pred, target), expected)


def test_cosine_mask_cost_hand_computed():
    pred = {"codes": torch.tensor([[1.0, 0.0], [1.0, 1.0]])}
    target = make_targets([2], codes=torch.tensor([[1.0, 0.0], [0.0, -2.0]]))
    # cost = 1 - (s + 1) / 2 = (1 - s) / 2 with s the cosine (scale-free: [0,-2] ~ [0,-1]).
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[0.0, 0.5], [(1 - r) / 2, (1 + r) / 2]])
    torch.testing.assert_close(cosine_mask_cost(pred, target, None), expected)


def test_l2_mask_cost_is_euclidean_distance():
    pred = {"codes": torch.tensor([[0.0, 0.0], [3.0, 4.0]])}
    target = make_targets([2], codes=torch.tensor([[0.0, 0.0], [0.0, 4.0]]))
    torch.testing.assert_close(l2_mask_cost(pred, target, None), torch.tensor([[0.0, 4.0], [5.0, 3.0]]))


def test_dice_mask_cost_on_decoded_masks():
    codec = DCTCodec(dim=SIZE * SIZE)  # exact round trip: decode(encode(m)).sigmoid() is m clipped to [.01, .99]
    left, top = half_masks()
    gt = torch.stack([left, top])
    pred = {"codes": codec.encode(gt)}
    target = make_targets([2], masks=gt, codes=codec.encode(gt), dim=codec.dim)
    fg, bg = 1 - MASK_EPS, MASK_EPS
    area, shared = 392, 196
    # Same mask: sum(p*g) = 392 * .99, sum(p) = 392 * (.99 + .01) = 392.
    same = 1 - (2 * area * fg + 1) / (area + area + 1)
    # Left vs top: sum(p*g) = 196 * .99 + 196 * .01 = 196.
    crossed = 1 - (2 * (shared * fg + shared * bg) + 1) / (area + area + 1)
    expected = torch.tensor([[same, crossed], [crossed, same]])
    torch.testing.assert_close(dice_mask_cost(pred, target, codec), expected, atol=1e-4, rtol=0)
    assert same < 0.011 and crossed == pytest.approx(0.5, abs=0.01)


def test_no_mask_cost_is_zeros():
    pred = {"codes": torch.randn(3, 2)}
    cost = no_mask_cost(pred, make_targets([2], codes=torch.randn(2, 2)), None)
    assert cost.shape == (3, 2)
    assert torch.count_nonzero(cost) == 0


def test_unknown_mask_cost_lists_valid_names():
    with pytest.raises(ValueError, match="bogus") as info:
        HungarianMatcher(DCTCodec(dim=4), mask_cost="bogus")
    for name in MASK_COSTS:
        assert name in str(info.value)


def test_cost_matrix_is_the_weighted_sum_of_terms():
    gen = torch.Generator().manual_seed(0)
    out = random_outputs(1, 4, 3, 2, gen)
    target = random_targets([3], 3, 2, gen)
    pred = {
        "logits": out["logits"][0],
        "boxes": out["boxes"][0],
        "boxes_norm": out["boxes"][0] / 100.0,
        "codes": out["codes"][0],
    }
    matcher = HungarianMatcher(None, "l2", cost_class=1.5, cost_l1=3.0, cost_giou=0.5, cost_mask=4.0)
    expected = (
        1.5 * focal_class_cost(pred, target)
        + 3.0 * l1_box_cost(pred, target)
        + 0.5 * giou_box_cost(pred, target)
        + 4.0 * l2_mask_cost(pred, target, None)
    )
    torch.testing.assert_close(matcher.cost_matrix(pred, target), expected)


# ---------------------------------------------------------------------------- assignment


def l1_only_matcher() -> HungarianMatcher:
    return HungarianMatcher(None, "none", cost_class=0.0, cost_l1=1.0, cost_giou=0.0, cost_mask=0.0)


def boxes_at(xs: list[float]) -> torch.Tensor:
    """10x10 boxes at x offsets ``xs`` (so the L1 cost of two of them is 2|dx| / 100)."""
    return torch.tensor([[x, 0.0, x + 10.0, 10.0] for x in xs])


def test_matcher_finds_optimum_where_greedy_fails():
    # GT at x = 0 and 4; predictions at x = 1, -3, 50. Costs (x100/2): [[1, 3], [3, 7], [50, 46]].
    # Greedy takes pred0-gt0 (1) then pred1-gt1 (7): total 8. The optimum pred0-gt1 + pred1-gt0 costs 6.
    outputs = {
        "logits": torch.zeros((1, 3, 2)),
        "boxes": boxes_at([1.0, -3.0, 50.0])[None],
        "codes": torch.zeros((1, 3, 2)),
    }
    target = make_targets([2], labels=[0, 1], boxes=boxes_at([0.0, 4.0]))
    ((rows, cols),) = l1_only_matcher().match(outputs, target)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}
    assert rows.dtype == cols.dtype == torch.int64


def test_full_cost_prefers_the_identical_prediction():
    gen = torch.Generator().manual_seed(1)
    target = random_targets([2], 3, 4, gen)
    outputs = random_outputs(1, 5, 3, 4, gen)
    # Plant GT 0 at query 3 and GT 1 at query 1 with confident right classes.
    for query, gt in ((3, 0), (1, 1)):
        outputs["boxes"][0, query] = target.boxes[gt]
        outputs["codes"][0, query] = target.codes[gt]
        outputs["logits"][0, query] = -10.0
        outputs["logits"][0, query, target.labels[gt]] = 10.0
    ((rows, cols),) = HungarianMatcher(None, "cosine").match(outputs, target)
    assert dict(zip(rows.tolist(), cols.tolist())) == {1: 1, 3: 0}


@pytest.mark.parametrize("sizes", [[1, 3, 2], [2, 0, 1], [0, 2, 0]], ids=["mixed", "one-empty", "mostly-empty"])
def test_batched_matching_equals_per_image(sizes):
    gen = torch.Generator().manual_seed(sum(sizes))
    num_classes, dim, k = 3, 4, 5
    outputs = random_outputs(len(sizes), k, num_classes, dim, gen)
    target = random_targets(sizes, num_classes, dim, gen)
    matcher = HungarianMatcher(None, "cosine")
    batched = as_lists(matcher.match(outputs, target))
    assert len(batched) == len(sizes)
    start = 0
    for b, n in enumerate(sizes):
        alone_out = {key: value[b : b + 1] for key, value in outputs.items()}
        gt = slice(start, start + n)
        alone_target = make_targets(
            [n], target.labels[gt].tolist(), target.boxes[gt], target.codes[gt], target.masks[gt], dim=dim
        )
        alone = as_lists(matcher.match(alone_out, alone_target))
        assert batched[b] == alone[0]
        assert len(batched[b][0]) == n == len(set(batched[b][0]))  # one-to-one, every GT matched
        assert sorted(batched[b][1]) == list(range(n))  # GT indices are local to the image
        start += n


def test_no_gt_in_any_image_gives_empty_indices():
    gen = torch.Generator().manual_seed(2)
    outputs = random_outputs(2, 4, 3, 2, gen)
    indices = HungarianMatcher(None, "cosine").match(outputs, make_targets([0, 0]))
    assert len(indices) == 2
    for rows, cols in indices:
        assert rows.numel() == cols.numel() == 0
        assert rows.dtype == cols.dtype == torch.int64


def test_match_stages_equals_matching_each_stage():
    gen = torch.Generator().manual_seed(3)
    sizes = [2, 3]
    stages = [random_outputs(2, 6, 3, 4, gen) for _ in range(2)]
    target = random_targets(sizes, 3, 4, gen)
    matcher = HungarianMatcher(None, "l2")
    together = [as_lists(indices) for indices in matcher.match_stages(stages, target)]
    separate = [as_lists(matcher.match(out, target)) for out in stages]
    assert together == separate
    assert together[0] != together[1]  # the stages really differ, so the check has teeth
