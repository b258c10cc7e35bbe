"""The typed config: the paper's defaults, overrides, did-you-mean errors, presets, identity hash."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from istr.config import Config, ConfigError, config_hash, load_config, to_dict, to_yaml

from .conftest import REPO


def leaves(node: dict, prefix: str = ""):
    """``(dotted.key, value)`` of every leaf of a nested mapping."""
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# What experiments/coco_r50.yaml, the paper's recipe, may set apart from the schema defaults: the augmentation of the
# authors' later release and the loader's worker count (the preset's header); never a model, loss or schedule value.
PAPER_PRESET_MAY_CHANGE = {"data.train_short_sizes", "data.num_workers", "data.crop.type", "data.crop.size",
                           "data.crop.prob", "data.crop.pre_crop_sizes"}


def test_defaults_are_the_paper_recipe_of_the_coco_r50_preset():
    defaults = load_config()
    assert defaults == Config()  # no file, no override: the schema's defaults, and they pass the value checks
    paper = dict(leaves(to_dict(load_config(REPO / "experiments" / "coco_r50.yaml"))))
    differ = {key for key, value in leaves(to_dict(defaults)) if paper[key] != value}
    assert differ <= PAPER_PRESET_MAY_CHANGE, f"defaults not the paper's: {sorted(differ - PAPER_PRESET_MAY_CHANGE)}"


def test_override_changes_value_and_type_checked():
    cfg = load_config(None, ["model.num_queries=7", "train.lr_steps=[5,9]"])
    assert cfg.model.num_queries == 7 and cfg.train.lr_steps == [5, 9]
    with pytest.raises(ConfigError, match="num_queries"):
        load_config(None, ["model.num_queries=many"])


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [("model.num_querys=5", "model.num_queries"), ("trian.max_steps=3", "train.max_steps")],
)
def test_unknown_key_names_closest_valid_key(override, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean '{suggestion}'"):
        load_config(None, [override])


def test_unknown_key_in_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  atention: self\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*model.attention"):
        load_config(path)


@pytest.mark.parametrize("preset", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_presets_load_with_every_value_they_set(preset):
    resolved = to_dict(load_config(preset))
    raw = OmegaConf.to_container(OmegaConf.load(preset))  # the YAML dialect the loader reads (5e-4 is a float)
    for dotted, value in leaves(raw):
        got = resolved
        for part in dotted.split("."):
            got = got[part]
        assert got == value, f"{preset.name}: {dotted} is {got!r} after loading, the preset says {value!r}"


def test_hash_is_identity_of_resolved_config():
    a, b = load_config(None, ["seed=1"]), load_config(None, ["seed=1"])
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(load_config(None, ["seed=2"]))


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["model.attention=dynamic", "codec.dim=40"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_an_older_run_config_with_a_retired_key_still_loads(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("codec:\n  type: pca\n  dim: 16\n  mask_size: 28\n")
    assert load_config(path).codec.dim == 16
    path.write_text("codec:\n  mask_size: 14\n")
    with pytest.raises(ConfigError, match="codec.mask_size: 14.*no longer supported"):
        load_config(path)
