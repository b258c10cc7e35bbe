"""Tests of the set prediction loss (docs/method.md#loss).

A perfect prediction (GT boxes, GT codes, confident right classes) must score ~0 on every term and a
perturbed one clearly more; deep supervision must add suffixed terms per stage, matched anew; the
weights are applied once, by term name; and the loss must train every parameter of a tiny ISTR.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from istr.codecs import DCTCodec, build_codec
from istr.config import LossConfig
from istr.losses import MASK_LOSSES, SetCriterion, build_criterion, loss_weights, weighted_sum
from istr.matcher import HungarianMatcher, build_matcher
from istr.model import build_model
from istr.targets import BatchTargets

from .conftest import NUM_CLASSES, REPO, batch_targets, random_stage

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 28
BOX_TERMS = ("loss_cls", "loss_l1", "loss_giou")
CONFIDENT = 20.0  # |logit|: sigmoid focal loss of a right, confident logit is ~1e-17


def planted_outputs(target: BatchTargets, k: int, dim: int, seed: int = 0) -> dict:
    """Outputs whose query i of image b is exactly GT i of image b; other queries are far-off confident negatives."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(target.sizes)
    logits = torch.full((batch, k, NUM_CLASSES), -CONFIDENT)
    boxes = torch.tensor([200.0, 200.0, 210.0, 210.0]).repeat(batch, k, 1)
    codes = torch.randn((batch, k, dim), generator=gen)
    start = 0
    for b, n in enumerate(target.sizes):
        gt = slice(start, start + n)
        boxes[b, :n] = target.boxes[gt]
        codes[b, :n] = target.codes[gt]
        logits[b, torch.arange(n), target.labels[gt]] = CONFIDENT
        start += n
    return {"logits": logits, "boxes": boxes, "codes": codes, "aux": []}


def criterion_for(codec, mask_loss: str = "l2+dice", deep_supervision: bool = True) -> SetCriterion:
    return SetCriterion(HungarianMatcher(codec), codec, mask_loss, deep_supervision=deep_supervision)


@pytest.fixture(scope="module")
def dct() -> DCTCodec:
    return DCTCodec(dim=SIZE * SIZE)  # exact round trip up to the [.01, .99] logit clip


@pytest.fixture(scope="module")
def perfect_case(dct) -> tuple[BatchTargets, dict, dict[str, torch.Tensor]]:
    target = batch_targets(dct, [2, 1])
    outputs = planted_outputs(target, k=4, dim=dct.dim)
    return target, outputs, criterion_for(dct)(outputs, target)


def test_perfect_prediction_has_near_zero_loss(perfect_case):
    _, _, losses = perfect_case
    assert set(losses) == {*BOX_TERMS, "loss_mask_l2", "loss_mask_dice"}
    assert losses["loss_cls"].item() < 1e-6
    assert losses["loss_l1"].item() < 1e-6
    assert losses["loss_giou"].item() < 1e-5
    assert losses["loss_mask_l2"].item() < 1e-8
    # decode(GT code) is the GT mask at probabilities .99 / .01: Dice ~ 1%, not 0.
    assert losses["loss_mask_dice"].item() < 0.03


def test_perturbed_prediction_has_clearly_larger_loss(perfect_case, dct):
    target, outputs, perfect = perfect_case
    perturbed = {
        "logits": torch.zeros_like(outputs["logits"]),  # unsure everywhere
        "boxes": outputs["boxes"] + torch.tensor([6.0, -4.0, 10.0, 3.0]),
        "codes": -outputs["codes"],  # decodes to the inverted masks
        "aux": [],
    }
    losses = criterion_for(dct)(perturbed, target)
    floors = {"loss_cls": 0.1, "loss_l1": 0.05, "loss_giou": 0.05, "loss_mask_l2": 1.0, "loss_mask_dice": 0.5}
    for name, floor in floors.items():
        assert losses[name].item() > perfect[name].item() + floor, name


def test_unknown_mask_loss_lists_valid_names(dct):
    with pytest.raises(ValueError, match="l2\\+dice"):
        criterion_for(dct, "focal")


@pytest.mark.parametrize("mask_loss", list(MASK_LOSSES))
def test_deep_supervision_keys_per_mask_arm(mask_loss, dct):
    gen = torch.Generator().manual_seed(4)
    target = batch_targets(dct, [2, 1])
    aux = [random_stage(2, 5, dct.dim, gen) for _ in range(2)]
    outputs = {**random_stage(2, 5, dct.dim, gen), "aux": aux}
    terms = (*BOX_TERMS, *MASK_LOSSES[mask_loss])

    losses = criterion_for(dct, mask_loss)(outputs, target)
    assert set(losses) == {f"{t}{s}" for t in terms for s in ("_s0", "_s1", "")}
    assert len(losses) == 3 * len(terms)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())

    # Each stage is matched anew: its terms equal the loss of that stage alone.
    single = criterion_for(dct, mask_loss, deep_supervision=False)
    for i, stage in enumerate(aux):
        alone = single({**stage, "aux": []}, target)
        for t in terms:
            torch.testing.assert_close(losses[f"{t}_s{i}"], alone[t])

    final_only = single(outputs, target)
    assert set(final_only) == set(terms)


def test_default_weights_are_the_ones_docs_method_states_for_every_term():
    """docs/method.md#loss states ``λ = (cls, L1, giou, mask)``: the defaults weigh each term, box and mask terms of
    every mask-loss arm, by exactly those numbers."""
    text = (REPO / "docs" / "method.md").read_text()
    stated = re.search(r"`L = λ_cls L_focal \+ λ_L1 L_L1 \+ λ_giou L_giou \+ λ_mask L_mask`, `λ = \(([^)]*)\)`", text)
    assert stated, "docs/method.md#loss no longer states the weights as `λ = (cls, L1, giou, mask)`"
    cls, l1, giou, mask = (float(v) for v in stated.group(1).split(","))
    mask_terms = {term for terms in MASK_LOSSES.values() for term in terms}
    assert loss_weights(LossConfig()) == {"loss_cls": cls, "loss_l1": l1, "loss_giou": giou,
                                          **dict.fromkeys(mask_terms, mask)}


def test_weighted_sum_applies_weights_by_name_and_stage_suffix():
    weights = loss_weights(LossConfig(weight_class=2.0, weight_l1=5.0, weight_giou=3.0, weight_mask=0.5))
    values = {"loss_cls": 1.0, "loss_l1_s0": 2.0, "loss_giou_s12": 4.0, "loss_mask_dice_s1": 3.0, "loss_mask_l2": 8.0}
    losses = {name: torch.tensor(v, requires_grad=True) for name, v in values.items()}
    total = weighted_sum(losses, weights)
    # 2*1 + 5*2 + 3*4 + 0.5*3 + 0.5*8
    assert total.item() == pytest.approx(29.5)
    total.backward()
    assert [losses[n].grad.item() for n in values] == [2.0, 5.0, 3.0, 0.5, 0.5]


def test_weighted_sum_rejects_empty_and_unknown_terms():
    weights = loss_weights(LossConfig())
    with pytest.raises(ValueError):
        weighted_sum({}, weights)
    with pytest.raises(KeyError):
        weighted_sum({"loss_bogus_s0": torch.tensor(1.0)}, weights)


# ---------------------------------------------------------------------------- gradients through a tiny ISTR


def fitted_pca(dim: int):
    """A PCA codec fitted on 64 random axis-aligned blobs in the 28x28 frame."""
    gen = torch.Generator().manual_seed(5)
    corners = torch.randint(0, SIZE // 2, (64, 2), generator=gen)
    extents = torch.randint(6, SIZE // 2 + 1, (64, 2), generator=gen)
    masks = torch.zeros((64, SIZE, SIZE))
    for mask, (x, y), (w, h) in zip(masks, corners.tolist(), extents.tolist()):
        mask[y : y + h, x : x + w] = 1
    codec = build_codec("pca", dim)
    codec.fit(masks)
    return codec


def tiny_losses(cfg, mask_loss: str):
    """Build a tiny ISTR + criterion, run one forward on random images -> (model, unweighted losses, weights)."""
    torch.manual_seed(0)
    codec = fitted_pca(cfg.codec.dim)
    model = build_model(cfg.model, NUM_CLASSES, codec.dim).train()
    loss_cfg = dataclasses.replace(cfg.loss, mask=mask_loss)
    criterion = build_criterion(loss_cfg, build_matcher(cfg.matcher, codec), codec)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    image_sizes = torch.tensor([[64, 64], [64, 64]])
    target = batch_targets(codec, [2, 1], seed=1)
    losses = criterion(model(images, image_sizes), target)
    return model, losses, loss_weights(loss_cfg)


def learnable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mask_loss", list(MASK_LOSSES))
def test_gradients_reach_every_trained_parameter(tiny_cfg, mask_loss):
    model, losses, weights = tiny_losses(tiny_cfg, mask_loss)
    num_stages = tiny_cfg.model.num_stages
    assert len(losses) == num_stages * (3 + len(MASK_LOSSES[mask_loss]))

    # The mask terms alone train the mask head of every stage.
    mask_terms = {k: v for k, v in losses.items() if k.startswith("loss_mask")}
    weighted_sum(mask_terms, weights).backward(retain_graph=True)
    for i, stage in enumerate(model.stages):
        grad = stage.code_head.weight.grad
        assert grad is not None and grad.abs().sum() > 0, f"stage {i} code_head gets no grad from {mask_loss}"

    model.zero_grad(set_to_none=True)
    weighted_sum(losses, weights).backward()
    params = learnable(model)
    missing = [name for name, p in params.items() if p.grad is None and name != "query_boxes.weight"]
    assert not missing, f"parameters without grad: {missing}"
    bad = [name for name, p in params.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite grads: {bad}"


def test_learnable_query_boxes_get_grad(tiny_cfg):
    model, losses, weights = tiny_losses(tiny_cfg, "l2+dice")
    weighted_sum(losses, weights).backward()
    grad = model.query_boxes.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_focal_class_loss_matches_hand_computation(dct):
    # One image, one GT of class 1 planted at query 0 with logit 0 (p = 1/2); every other logit is -20.
    target = batch_targets(dct, [1])
    outputs = planted_outputs(target, k=2, dim=dct.dim)
    outputs["logits"][0, 0, target.labels[0]] = 0.0
    losses = criterion_for(dct)(outputs, target)
    # Focal loss of a positive at p = 1/2: alpha * (1 - p)^2 * ln 2 = .25 * .25 * ln 2 (negatives ~0), / 1 box.
    assert losses["loss_cls"].item() == pytest.approx(0.0625 * math.log(2), rel=1e-4)
