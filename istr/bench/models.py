"""The two models ``istr bench`` compares, built alike: the same norm (FrozenBatchNorm, all ResNet stages
trainable), random weights (nothing downloaded) and the same AdamW + grad-clip step (istr/engine/optim.py), so
the timings differ by the methods only."""

from __future__ import annotations

import torch
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from istr.bench.inputs import fit_bench_codec
from istr.codecs import MaskCodec
from istr.config import Config, load_config
from istr.engine.optim import build_optimizer
from istr.losses import SetCriterion, build_criterion, loss_weights
from istr.matcher import build_matcher
from istr.model import ISTR, build_model

BACKBONES = {"r18": "resnet18", "r50": "resnet50", "r101": "resnet101"}


def build_istr(
    backbone: str, num_classes: int, num_queries: int | None, device: torch.device, seed: int
) -> tuple[
    Config,
    ISTR,
    MaskCodec,
    torch.optim.Optimizer,
    torch.optim.lr_scheduler.LambdaLR,
    SetCriterion,
    dict[str, float],
]:
    """The paper's ISTR (6 stages, 300 queries unless ``num_queries``) with FrozenBN, its codec, optimizer,
    schedule, criterion and loss weights; the sparse pooler on CPU, RoIAlign on CUDA."""
    overrides = [
        f"model.backbone={backbone}",
        "model.norm=frozen_bn",
        "model.hidden_dim=256",
        f"model.num_queries={num_queries or 300}",
        "model.num_stages=6",
        f"model.pooler={'sparse' if device.type == 'cpu' else 'roi_align'}",
    ]
    cfg = load_config(None, overrides)
    codec = fit_bench_codec(cfg.codec.dim, seed).to(device)
    torch.manual_seed(seed)
    model = build_model(cfg.model, num_classes, codec.dim).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(model, cfg.train)
    criterion = build_criterion(cfg.loss, build_matcher(cfg.matcher, codec), codec)
    return cfg, model, codec, optimizer, scheduler, criterion, loss_weights(cfg.loss)


def build_maskrcnn(
    backbone: str, num_classes: int, height: int, width: int, device: torch.device, seed: int
) -> MaskRCNN:
    """torchvision Mask R-CNN (+1 background class) with ISTR's norm: FrozenBN, all 5 stages trainable.

    ``min_size = min(H, W)`` and ``max_size = max(H, W)`` make its transform's resize scale exactly 1,
    so it sees the H x W input as given (and pads it to a multiple of 32, as ISTR's collate does).

    Same structure as ``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)`` except that
    builder picks plain BatchNorm when no weights are given; FrozenBN matches ISTR's ``frozen_bn``.
    ``box_score_thresh=0`` so the random-weight model still returns its 100 detections per image
    (with the default 0.05 it would return none and skip the mask head and paste).
    """
    torch.manual_seed(seed)
    fpn = resnet_fpn_backbone(backbone_name=backbone, weights=None, trainable_layers=5)
    model = MaskRCNN(
        fpn, num_classes=num_classes + 1, min_size=min(height, width), max_size=max(height, width), box_score_thresh=0.0
    )
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model
