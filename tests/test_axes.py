"""The ablation axes are listed once (istr/axes.py), and a new arm is one function, one registry line and a value in
``sweeps/<axis>.yaml`` (docs/adding-an-arm.md): the sweep harness takes it and it changes the computation.

Each throwaway arm below is registered with one ``monkeypatch.setitem`` on the registry that ``istr/axes.py`` names,
i.e. the one registry line a real arm adds, and its value is added to a copy of the axis' spec.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from istr.axes import AXES, AXIS_NAMES, CODEC_AXES, REGISTRY_AXES, Axis, axis, config_value
from istr.codecs import CODECS, build_codec
from istr.codecs.pca import PCACodec
from istr.config import Config, load_config
from istr.engine.train import check_arms
from istr.losses import MASK_LOSSES, MaskTerm, SetCriterion, loss_weights, weighted_sum
from istr.matcher import MASK_COSTS, HungarianMatcher
from istr.model.head import ATTENTIONS, DynamicConv, ISTRStage, QuerySelfAttention, StageAttention
from istr.registry import UnknownArmError
from istr.sweep.runner import grid_cells
from istr.sweep.spec import SpecError

from .conftest import REPO, batch_targets, random_stage, rect_masks

pytestmark = pytest.mark.usefixtures("one_thread")

PRESET = REPO / "experiments" / "tiny.yaml"
DEFAULTS = Config()
ARM = "throwaway"
CALLS: list[str] = []  # which throwaway functions ran


# ---------------------------------------------------------------------------- the throwaway arms


class ThrowawayCodec(PCACodec):
    """PCA with every code halved: a codec whose reconstruction differs from PCA's."""

    def _encode(self, masks: torch.Tensor) -> torch.Tensor:
        CALLS.append("embedding")
        return super()._encode(masks) * 0.5


def throwaway_mask_cost(pred: dict, target: Any, codec: torch.nn.Module) -> torch.Tensor:
    """L1 distance between embeddings."""
    CALLS.append("mask_cost")
    return torch.cdist(pred["codes"], target.codes, p=1)


def throwaway_mask_loss(codes, target_codes, target_masks, codec, num_boxes) -> torch.Tensor:
    """Smooth L1 between embeddings, / num_boxes."""
    CALLS.append("loss")
    return torch.nn.functional.smooth_l1_loss(codes, target_codes, reduction="sum") / num_boxes


class ThrowawayInteraction(DynamicConv):
    """The RoI features alone, the query ignored (same parameters as DynamicConv, so the same initialisation)."""

    def forward(self, queries: torch.Tensor, roi_features: torch.Tensor) -> torch.Tensor:
        CALLS.append("attention")
        return torch.relu(self.norm3(self.out_layer(roi_features.flatten(1))))


# axis -> the one registry line's value
ENTRIES: dict[str, Any] = {
    "embedding": ThrowawayCodec,
    "mask_cost": throwaway_mask_cost,
    "loss": {"loss_mask_throwaway": MaskTerm(throwaway_mask_loss)},
    "attention": StageAttention(QuerySelfAttention, ThrowawayInteraction),
}
NEW_VALUES = {"embedding_dim": 24}  # an axis of plain values: a new arm is its value alone


@pytest.fixture(autouse=True)
def _no_calls_yet():
    CALLS.clear()


def register(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The one registry line, undone after the test."""
    monkeypatch.setitem(axis(name).arms(), ARM, ENTRIES[name])


def spec_with(tmp_path: Path, ax: Axis, value: Any) -> Path:
    """A copy of the axis' spec with ``value`` added to its values."""
    raw = yaml.safe_load((REPO / ax.spec).read_text())
    raw["parameters"][ax.keys[0]]["values"].append(value)
    path = tmp_path / ax.spec
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def pca() -> PCACodec:
    codec = build_codec("pca", 8)
    codec.fit(rect_masks(64))
    return codec


# ---------------------------------------------------------------------------- the list itself


def test_the_axes_are_the_sweep_specs_but_hparams() -> None:
    specs = {p.stem for p in (REPO / "sweeps").glob("*.yaml")}
    assert sorted(AXIS_NAMES) == sorted(specs - {"hparams"}) and len(set(AXIS_NAMES)) == len(AXES)
    assert AXIS_NAMES == ("embedding", "embedding_dim", "mask_cost", "loss", "attention")  # the paper's order
    assert all((REPO / ax.spec).is_file() and ax.spec.as_posix() == f"sweeps/{ax.name}.yaml" for ax in AXES)


def test_each_axis_names_its_specs_keys_and_the_registry_holding_its_arms() -> None:
    registries = {"embedding": CODECS, "mask_cost": MASK_COSTS, "loss": MASK_LOSSES, "attention": ATTENTIONS}
    assert {ax.name: ax.arms() for ax in REGISTRY_AXES} == registries
    assert all(ax.arms() is registries[ax.name] for ax in REGISTRY_AXES)  # the dict the builders read
    for ax in AXES:
        spec = ax.read_spec()
        assert spec.axis == ax.name and tuple(spec.axis_keys()) == ax.keys
        assert ax.codec == all(key.startswith("codec.") for key in ax.keys)
        if ax.registry:  # the preset's default and every value the spec sweeps are registered arms
            values = {config_value(DEFAULTS, ax.keys[0]), *spec.parameters[ax.keys[0]]["values"]}
            assert values <= set(ax.arms()), ax.name
    assert CODEC_AXES == ("embedding", "embedding_dim")
    with pytest.raises(ValueError, match="codec.dim"):
        axis("embedding_dim").arms()
    with pytest.raises(KeyError, match="not an ablation axis"):
        axis("hparams")


def test_the_leaves_import_without_torch() -> None:
    code = "import sys, istr.axes, istr.spec_file; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------- a new arm: the harness takes it


@pytest.mark.parametrize("name", AXIS_NAMES)
def test_the_harness_takes_a_new_arm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    ax = axis(name)
    key = ax.keys[0]
    value = ARM if ax.registry else NEW_VALUES[name]
    spec = spec_with(tmp_path, ax, value)
    if ax.registry:  # the value alone is not an arm: the spec fails before anything is queued
        with pytest.raises(SpecError, match=re.escape(f"{key}='{ARM}' is not a known arm")):
            grid_cells(spec, str(PRESET), seeds=1)
        register(monkeypatch, name)
    cells = grid_cells(spec, str(PRESET), seeds=1)
    assert len(cells) == len(ax.read_spec().parameters[key]["values"]) + 1  # one distinct cell per arm
    (new,) = [cell for cell in cells.values() if cell.params[key] == value]
    assert new.arm == str(value) and new.seed == 0
    cfg = load_config(PRESET, new.overrides)
    assert config_value(cfg, key) == value
    check_arms(cfg)
    if ax.registry:
        monkeypatch.delitem(ax.arms(), ARM)
        with pytest.raises(UnknownArmError):
            check_arms(cfg)


# ---------------------------------------------------------------------------- a new arm: it changes the computation


def test_a_new_codec_changes_the_reconstruction(monkeypatch: pytest.MonkeyPatch) -> None:
    register(monkeypatch, "embedding")
    codecs = {arm: build_codec(arm, 8) for arm in (ARM, DEFAULTS.codec.type)}
    for codec in codecs.values():
        codec.fit(rect_masks(64))
    held_out = rect_masks(8, seed=1)
    new, default = (codec.decode(codec.encode(held_out)) for codec in codecs.values())
    assert isinstance(codecs[ARM], ThrowawayCodec) and "embedding" in CALLS
    assert not torch.allclose(new, default, atol=1e-3)


def test_a_new_mask_cost_changes_the_cost_matrix(pca: PCACodec, monkeypatch: pytest.MonkeyPatch) -> None:
    register(monkeypatch, "mask_cost")
    target = batch_targets(pca, [2, 1])
    pred = {k: v.flatten(0, 1) for k, v in random_stage(2, 4, pca.dim, torch.Generator().manual_seed(0)).items()}
    pred["boxes_norm"] = pred["boxes"] / 64.0
    default = HungarianMatcher(pca, DEFAULTS.matcher.mask_cost).cost_matrix(pred, target)
    assert "mask_cost" not in CALLS
    assert not torch.allclose(HungarianMatcher(pca, ARM).cost_matrix(pred, target), default)
    assert "mask_cost" in CALLS


def test_a_new_mask_loss_changes_the_loss(pca: PCACodec, monkeypatch: pytest.MonkeyPatch) -> None:
    register(monkeypatch, "loss")
    target = batch_targets(pca, [2, 1])
    outputs = {**random_stage(2, 4, pca.dim, torch.Generator().manual_seed(0)), "aux": []}
    weights = loss_weights(DEFAULTS.loss)  # the new term is weighted by its MaskTerm's weight key
    terms = {arm: SetCriterion(HungarianMatcher(pca), pca, arm)(outputs, target) for arm in (ARM, DEFAULTS.loss.mask)}
    assert "loss_mask_throwaway" in terms[ARM] and "loss" in CALLS
    assert weighted_sum(terms[ARM], weights).item() != pytest.approx(
        weighted_sum(terms[DEFAULTS.loss.mask], weights).item(), rel=1e-4)


def test_a_new_attention_changes_the_stage_output(monkeypatch: pytest.MonkeyPatch) -> None:
    register(monkeypatch, "attention")
    gen = torch.Generator().manual_seed(0)
    batch, k, dim, size = 2, 3, 16, 7
    queries = torch.randn((batch, k, dim), generator=gen)
    rois = torch.randn((batch * k, size * size, dim), generator=gen)
    xy = torch.rand((batch, k, 2), generator=gen) * 40
    boxes = torch.cat([xy, xy + 10], dim=-1)

    def stage(attention: str) -> ISTRStage:
        torch.manual_seed(0)
        return ISTRStage(num_classes=3, code_dim=8, hidden_dim=dim, num_heads=2, ffn_dim=32, dynamic_dim=4,
                         pooler_resolution=size, attention=attention)  # fmt: skip

    new, default = stage(ARM), stage(DEFAULTS.model.attention)
    assert isinstance(new.interaction, ThrowawayInteraction)
    assert sum(p.numel() for p in new.parameters()) == sum(p.numel() for p in default.parameters())
    assert not torch.allclose(new(queries, rois, boxes)["queries"], default(queries, rois, boxes)["queries"])
    assert "attention" in CALLS
