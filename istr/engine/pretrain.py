"""``model.pretrained=auto``: a backbone the project pretrains once and caches (docs/method.md#reference-choices).

The paper fine-tunes from an ImageNet backbone; nothing may be downloaded here, so the small presets
start from a ResNet+FPN pretrained on generated shapes instead. The task is dense shape
classification (per-pixel cross-entropy over background + the shape classes, from FPN P2): it
teaches what the detector needs from its backbone, where objects are and what they are, at the
FPN's finest level. Its images come from a generator seed (``data.synth.seed + pretrain.seed_offset``)
whose stream is independent of the ablation's train and val images. The weights are cached under
``<cache_dir>/backbones/`` by the hash of everything that shapes them, like the codec.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy, interpolate
from torch.utils.data import DataLoader

from istr.config import Config
from istr.data.build import build_dataset, ensure_dataset
from istr.data.collate import collate_batch
from istr.data.synth import SHAPES, annotation_path
from istr.io import atomic_torch_save, atomic_write_json
from istr.model.backbone import BackboneFPN
from istr.model.istr import PIXEL_MEAN, PIXEL_STD

log = logging.getLogger(__name__)
_TASK_VERSION = 1  # bump when the pretraining task changes, so old caches are not reused


def pretrain_identity(cfg: Config) -> dict:
    """Everything that shapes the pretrained weights (the cache key is its hash)."""
    synth, pre = cfg.data.synth, cfg.pretrain
    return {
        "task": "dense-shape-classification",
        "version": _TASK_VERSION,
        "backbone": cfg.model.backbone,
        "hidden_dim": cfg.model.hidden_dim,
        "norm": cfg.model.norm,
        "train_short_sizes": list(cfg.data.train_short_sizes),
        "train_max_size": cfg.data.train_max_size,
        "flip_prob": cfg.data.flip_prob,
        "crop": asdict(cfg.data.crop),
        "synth": {k: getattr(synth, k) for k in ("image_size", "min_instances", "max_instances",
                                                 "min_object_frac", "max_object_frac")},
        "generator_seed": synth.seed + pre.seed_offset,
        "num_images": pre.num_images,
        "steps": pre.steps,
        "batch_size": pre.batch_size,
        "lr": pre.lr,
    }


def cache_path(cfg: Config) -> Path:
    identity = pretrain_identity(cfg)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.cache_dir) / "backbones" / f"{cfg.model.backbone}-{digest}.pt"


class DenseShapeHead(nn.Module):
    """P2 -> per-pixel logits over background + shape classes, at image resolution."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                                    nn.Conv2d(channels, num_classes + 1, 1))

    def forward(self, p2: Tensor, size: tuple[int, int]) -> Tensor:
        return interpolate(self.layers(p2), size=size, mode="bilinear", align_corners=False)


def semantic_targets(targets: list[dict], height: int, width: int) -> Tensor:
    """Per-pixel class index (0 = background or padding, label + 1 inside an instance mask)."""
    out = torch.zeros(len(targets), height, width, dtype=torch.long)
    for slot, target in zip(out, targets, strict=True):
        for mask, label in zip(target["masks"], target["labels"], strict=True):
            slot[: mask.shape[0], : mask.shape[1]][mask.bool()] = int(label) + 1
    return out


def pretrain_data(cfg: Config, folder: Path):
    """The preset's data config pointed at the pretraining images: its own folder, size and generator seed."""
    synth = replace(cfg.data.synth, enabled=True, num_train=cfg.pretrain.num_images, num_val=0,
                    seed=cfg.data.synth.seed + cfg.pretrain.seed_offset)
    return replace(cfg.data, root=str(folder), synth=synth,
                   train_json=str(annotation_path("", "train")), train_images="images/train",
                   val_json=str(annotation_path("", "val")), val_images="images/val")


def pretrain_backbone(cfg: Config, out: Path) -> dict:
    """Train ``BackboneFPN`` + a dense head for ``pretrain.steps``; write the backbone's state dict to ``out``."""
    # The caller's RNG state is left as it was: a run must not depend on whether the cache existed.
    with torch.random.fork_rng():
        torch.manual_seed(cfg.pretrain.seed_offset)
        return _pretrain(cfg, out)


def _pretrain(cfg: Config, out: Path) -> dict:
    pre = cfg.pretrain
    started = time.perf_counter()
    data_cfg = pretrain_data(cfg, out.with_suffix(".data"))
    ensure_dataset(data_cfg)  # the generator's own folder rules and marker, as for the ablation's data
    dataset = build_dataset(data_cfg, "train", train=True)
    backbone = BackboneFPN(cfg.model.backbone, cfg.model.hidden_dim, cfg.model.norm)
    head = DenseShapeHead(cfg.model.hidden_dim, len(SHAPES))
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=pre.lr, weight_decay=1e-4)
    warmup = max(1, pre.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / pre.steps, 1.0))))
    generator = torch.Generator().manual_seed(pre.seed_offset)
    loader = DataLoader(dataset, batch_size=pre.batch_size, shuffle=True, drop_last=True, generator=generator,
                        num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
                        collate_fn=partial(collate_batch, size_divisibility=cfg.data.size_divisibility))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (PIXEL_MEAN, PIXEL_STD))  # as ISTR.forward
    backbone.train()
    head.train()
    step, recent_loss, recent_acc = 0, [], []
    while step < pre.steps:
        for batch in loader:
            images = batch["images"].float()
            height, width = images.shape[-2:]
            labels = semantic_targets(batch["targets"], height, width)
            logits = head(backbone((images - mean) / std)["p2"], (height, width))
            loss = cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            recent_loss = (recent_loss + [loss.item()])[-20:]
            recent_acc = (recent_acc + [(logits.argmax(1) == labels).float().mean().item()])[-20:]
            if step % 50 == 0:
                log.info("pretrain step %d/%d loss %.3f pixel acc %.3f", step, pre.steps,
                         sum(recent_loss) / len(recent_loss), sum(recent_acc) / len(recent_acc))
            if step >= pre.steps:
                break
    seconds = time.perf_counter() - started
    atomic_torch_save(out, backbone.state_dict())
    stats = {"seconds": round(seconds, 1), "steps": step, "final_loss": sum(recent_loss) / len(recent_loss),
             "final_pixel_acc": sum(recent_acc) / len(recent_acc), "identity": pretrain_identity(cfg)}
    atomic_write_json(out.with_suffix(".json"), stats)
    return stats


def resolve_backbone_weights(cfg: Config, build: bool = True) -> Path | None:
    """``model.pretrained`` -> a local weights file (None = from scratch).

    ``auto`` is the cached project backbone, pretrained first when missing (and ``build``);
    ``none`` or ``""`` means from scratch; anything else is a path to a local state dict.
    """
    value = cfg.model.pretrained
    if value in ("", "none"):
        return None
    if value != "auto":
        return Path(value)
    path = cache_path(cfg)
    if path.is_file():
        log.info("pretrained backbone: reusing %s", path)
        return path
    if not build:
        raise FileNotFoundError(f"{path} is missing; run 'istr pretrain-backbone' first")
    print(f"pretraining the backbone once ({cfg.pretrain.steps} steps on generated shapes) -> {path}", flush=True)
    stats = pretrain_backbone(cfg, path)
    print(f"pretrained backbone in {stats['seconds']:.0f} s (one-time cost, cached; final pixel accuracy "
          f"{stats['final_pixel_acc']:.3f})", flush=True)
    return path
