"""Typed configuration, and the only reader of config YAML: presets and run dirs' config.yaml.

Sweep specs are YAML too but no configs: ``istr/sweep/spec.py`` and ``analysis/load.py`` read them
(docs/architecture.md#layers).

One schema of nested dataclasses whose defaults are the paper's values (docs/method.md#architecture, #training).
Presets in ``experiments/`` override it, ``key.sub=value`` strings override the preset, and an
unknown key is an error that names the closest valid key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from istr.mask_size import MASK_SIZE


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class SynthConfig:
    """Generated shapes dataset, made under ``data.root`` when missing (``istr synth``).

    The one home of the generator's defaults: ``istr synth`` and ``generate_synthetic_coco`` read them from here.
    """

    enabled: bool = False
    num_train: int = 2000
    num_val: int = 200
    image_size: int = 128
    min_instances: int = 1
    max_instances: int = 8
    min_object_frac: float = 0.08
    max_object_frac: float = 0.6
    seed: int = 0


@dataclass
class CropConfig:
    """Training crop before the multi-scale resize (docs/method.md#training); off = none."""

    type: str = "none"  # none | relative_range | absolute_range (detectron2's RandomCrop)
    size: list[float] = field(default_factory=lambda: [0.7, 0.7])
    prob: float = 0.5
    pre_crop_sizes: list[int] = field(default_factory=lambda: [400, 500, 600])


@dataclass
class DataConfig:
    """COCO-format data; paths other than ``root`` are relative to ``root``."""

    root: str = "datasets/coco"
    train_json: str = "annotations/instances_train2017.json"
    train_images: str = "train2017"
    val_json: str = "annotations/instances_val2017.json"
    val_images: str = "val2017"
    # docs/method.md#training: multi-scale training, test short side 800 / max 1333.
    train_short_sizes: list[int] = field(
        default_factory=lambda: [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
    )
    train_max_size: int = 1333
    test_short_size: int = 800
    test_max_size: int = 1333
    flip_prob: float = 0.5
    size_divisibility: int = 32
    num_workers: int = 2
    validate: bool = True
    crop: CropConfig = field(default_factory=CropConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class CodecConfig:
    """Mask embedding (docs/method.md#mask-embedding): ``type`` is an ablation axis, ``dim`` is l."""

    type: str = "pca"
    dim: int = 60
    max_fit_masks: int = 200_000
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """ISTR architecture (docs/method.md#architecture)."""

    backbone: str = "resnet50"
    # auto: the project's own backbone, pretrained once on generated shapes and cached
    # (istr pretrain-backbone); none: from scratch; else a LOCAL torchvision ResNet state dict.
    pretrained: str = "none"
    norm: str = "frozen_bn"  # frozen_bn (pretrained) | bn (from scratch)
    freeze_at: int = 2  # with pretrained weights: 0 trains all, 1 fixes the stem, 2 also the first stage
    hidden_dim: int = 256
    num_queries: int = 300
    num_stages: int = 6
    num_heads: int = 8
    ffn_dim: int = 2048
    dynamic_dim: int = 64
    pooler_resolution: int = 7
    pooler_sampling_ratio: int = 2
    # roi_align (torchvision) | grid_sample (same sampling, multi-threaded on CPU) | sparse (grid_sample's
    # sampling as one sparse product; fastest on CPU, CPU only) | auto (sparse on CPU, grid_sample elsewhere)
    pooler: str = "roi_align"
    head_layers: int = 3  # Linear-LN-ELU blocks of the class, box and mask towers
    attention: str = "self+dynamic"
    prior_prob: float = 0.01
    dropout: float = 0.0


@dataclass
class MatcherConfig:
    """Matching cost of docs/method.md#matching-cost; ``mask_cost`` is an ablation axis."""

    mask_cost: str = "cosine"
    cost_class: float = 2.0
    cost_l1: float = 5.0
    cost_giou: float = 2.0
    cost_mask: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


@dataclass
class LossConfig:
    """Set prediction loss of docs/method.md#loss; ``mask`` is an ablation axis."""

    mask: str = "l2+dice"
    weight_class: float = 2.0
    weight_l1: float = 5.0
    weight_giou: float = 2.0
    weight_mask: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    deep_supervision: bool = True


@dataclass
class TrainConfig:
    """Optimisation recipe (docs/method.md#training)."""

    max_steps: int = 270_000
    batch_size: int = 16  # global batch; split across DDP ranks
    lr: float = 2.5e-5
    weight_decay: float = 1e-4
    warmup_steps: int = 1000
    warmup_factor: float = 0.01
    lr_steps: list[int] = field(default_factory=lambda: [210_000, 250_000])
    # Schedule as fractions of max_steps (docs/own-data.md); when set they replace warmup_steps / lr_steps.
    warmup_frac: float | None = None
    lr_step_fracs: list[float] | None = None
    lr_gamma: float = 0.1
    # step: x lr_gamma at each lr_steps (the paper's); cosine: half-cosine from lr to 0 over max_steps after warm-up.
    lr_schedule: str = "step"
    # lr of the (pretrained) backbone + FPN relative to train.lr; 1 = one lr for all, as the paper.
    backbone_lr_mult: float = 1.0
    clip_grad_norm: float = 1.0
    checkpoint_every: int = 5000
    # false: a finished run keeps its weights only (a third of the checkpoint); true: also the optimizer
    # and scheduler state, so that it can be resumed with a larger max_steps.
    keep_optimizer_state: bool = False
    log_every: int = 20
    eval_every: int = 0  # 0 = evaluate only at the end
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast where the device has native bf16 (CUDA; CPUs with AVX-512 BF16 / AMX)
    channels_last: bool = True  # CUDA only
    compile: bool = False
    num_threads: int = 0  # torch intra-op threads on CPU; 0 = torch default


@dataclass
class EvalConfig:
    """Inference (docs/method.md#inference) and COCOeval settings."""

    max_detections: int = 100
    mask_threshold: float = 0.5
    batch_size: int = 8


@dataclass
class LoggingConfig:
    """Sinks; W&B runs offline unless the user logged in and sets mode=online."""

    wandb: bool = True
    wandb_project: str = "istr"
    wandb_entity: str = ""
    wandb_mode: str = "offline"
    wandb_group: str = ""
    wandb_job_type: str = "train"
    progress: bool = True


@dataclass
class PretrainConfig:
    """``model.pretrained=auto``: a backbone pretrained once on generated shapes (docs/method.md#reference-choices)."""

    num_images: int = 2000
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3
    seed_offset: int = 1000  # generator seed = data.synth.seed + this: images disjoint from the ablation's


@dataclass
class Config:
    seed: int = 0
    cache_dir: str = "runs/cache"
    data: DataConfig = field(default_factory=DataConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, (dict, DictConfig)) and key != "params":
            keys.extend(_all_keys(value, dotted + "."))
    return keys


def _unknown_key_error(bad_key: str, source: str) -> ConfigError:
    valid = _all_keys(OmegaConf.structured(Config))
    close = difflib.get_close_matches(bad_key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{bad_key}' in {source}{hint}")


def _merge(base: DictConfig, other: Any, source: str, full_key: str | None = None) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except (ConfigKeyError, ConfigAttributeError) as err:
        raise _unknown_key_error(full_key or err.full_key or str(err.key), source) from None
    except ValidationError as err:
        raise ConfigError(f"bad value for '{err.full_key}' in {source}: {err.msg}") from None


# Keys older run dirs' config.yaml still hold, with the only value they could have had; dropped on load so
# those runs stay readable (any other value is an error: the run was made by a different model).
RETIRED_KEYS: dict[str, Any] = {"codec.mask_size": 28}


def _drop_retired(loaded: DictConfig, source: str) -> DictConfig:
    for dotted, fixed in RETIRED_KEYS.items():
        parent, _, leaf = dotted.rpartition(".")
        node = OmegaConf.select(loaded, parent) if parent else loaded
        if isinstance(node, DictConfig) and leaf in node:
            if node[leaf] != fixed:
                raise ConfigError(f"{source}: '{dotted}: {node[leaf]}' is no longer supported (it is fixed at {fixed})")
            del node[leaf]
    return loaded


def _read_yaml(path: Path) -> DictConfig:
    """``path`` as a mapping; a YAML syntax error names the file and the line."""
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path}:{line} is not valid YAML ({getattr(err, 'problem', None) or err})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path} holds a {type(loaded).__name__}, not a mapping of config keys")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults <- YAML preset at ``path`` <- ``key.sub=value`` overrides."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        cfg = _merge(cfg, _drop_retired(_read_yaml(path), str(path)), str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key = item.split("=", 1)[0]
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'", key)
    OmegaConf.set_readonly(cfg, False)
    result: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate_values(result)
    return result


def _rule(test: Callable[[float], bool], text: str, non_empty: bool = False) -> tuple[Callable[[Any], bool], str]:
    def ok(value: Any) -> bool:
        values = value if isinstance(value, list) else [value]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        return (bool(values) or not non_empty) and numbers and all(test(v) for v in values)

    return ok, text


_POSITIVE = _rule(lambda v: v >= 1, ">= 1")
_COUNT = _rule(lambda v: v >= 0, ">= 0")
_NON_NEGATIVE = _rule(lambda v: v >= 0, ">= 0 (finite)")
_ABOVE_ZERO = _rule(lambda v: v > 0, "> 0 (finite)")
_PROBABILITY = _rule(lambda v: 0 <= v <= 1, "[0, 1]")
_FRACTION = _rule(lambda v: 0 < v <= 1, "(0, 1]")

LR_SCHEDULES = ("step", "cosine")  # train.lr_schedule (lr_factor in istr/engine/optim.py)

# Every numeric key with a domain, and train.lr_schedule's names; each element of a list value must be in range.
VALUE_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.train_short_sizes": _rule(lambda v: v >= 1, "a non-empty list of values >= 1", non_empty=True),
    **dict.fromkeys(["data.train_max_size", "data.test_short_size", "data.test_max_size",
                     "data.size_divisibility", "data.synth.num_train", "data.synth.num_val",
                     "data.synth.max_instances", "codec.max_fit_masks", "model.hidden_dim",
                     "model.num_queries", "model.num_stages", "model.num_heads", "model.ffn_dim",
                     "model.dynamic_dim", "model.pooler_resolution", "model.head_layers", "train.max_steps",
                     "train.batch_size", "train.checkpoint_every", "train.log_every", "eval.max_detections",
                     "eval.batch_size", "pretrain.num_images", "pretrain.steps", "pretrain.batch_size",
                     "data.crop.pre_crop_sizes"], _POSITIVE),
    **dict.fromkeys(["data.num_workers", "data.synth.min_instances", "model.pooler_sampling_ratio",
                     "train.warmup_steps", "train.lr_steps", "train.eval_every", "train.num_threads"], _COUNT),
    **dict.fromkeys(["matcher.cost_class", "matcher.cost_l1", "matcher.cost_giou", "matcher.cost_mask",
                     "matcher.focal_gamma", "loss.weight_class", "loss.weight_l1", "loss.weight_giou",
                     "loss.weight_mask", "loss.focal_gamma", "train.weight_decay"], _NON_NEGATIVE),
    **dict.fromkeys(["train.lr", "train.clip_grad_norm", "train.backbone_lr_mult", "pretrain.lr", "data.crop.size"],
                    _ABOVE_ZERO),
    **dict.fromkeys(["data.flip_prob", "matcher.focal_alpha", "loss.focal_alpha", "eval.mask_threshold",
                     "train.warmup_factor", "data.crop.prob"], _PROBABILITY),
    **dict.fromkeys(["data.synth.min_object_frac", "data.synth.max_object_frac", "train.lr_gamma",
                     "train.lr_step_fracs"], _FRACTION),
    "data.synth.image_size": _rule(lambda v: v >= 16, ">= 16"),
    # an embedding longer than the mask it encodes has no use, and PCA/DCT have no more components
    "codec.dim": _rule(lambda v: 1 <= v <= MASK_SIZE**2, f"1 to {MASK_SIZE**2} (the mask's pixels)"),
    "model.prior_prob": _rule(lambda v: 0 < v < 1, "(0, 1)"),
    "model.dropout": _rule(lambda v: 0 <= v < 1, "[0, 1)"),
    "train.warmup_frac": _rule(lambda v: 0 <= v < 1, "[0, 1)"),
    "model.freeze_at": _rule(lambda v: 0 <= v <= 2, "0, 1 or 2"),
    "train.lr_schedule": (lambda v: v in LR_SCHEDULES, " or ".join(LR_SCHEDULES)),
}


def _value(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate_values(cfg: Config) -> None:
    """Reject a numeric value outside its domain (:data:`VALUE_RANGES`), naming the key and the range."""
    for key, (ok, text) in VALUE_RANGES.items():
        value = _value(cfg, key)
        if value is not None and not ok(value):
            raise ConfigError(f"{key}={value!r} is out of range; valid: {text}")
    pairs = [("data.synth.min_instances", "data.synth.max_instances"),
             ("data.synth.min_object_frac", "data.synth.max_object_frac")]
    for low, high in pairs:
        if _value(cfg, low) > _value(cfg, high):
            raise ConfigError(f"{low}={_value(cfg, low)!r} exceeds {high}={_value(cfg, high)!r}; need {low} <= {high}")
    if cfg.model.hidden_dim % cfg.model.num_heads:
        raise ConfigError(f"model.hidden_dim={cfg.model.hidden_dim} must be a multiple of "
                          f"model.num_heads={cfg.model.num_heads}")


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_hash(cfg: Config) -> str:
    """Identity of a run: hash of the resolved config (docs/architecture.md#layers)."""
    payload = json.dumps(to_dict(cfg), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
