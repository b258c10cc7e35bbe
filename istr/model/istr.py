"""ISTR: learnable query boxes/features refined over N stages (docs/method.md#architecture, Fig. 2).

The model predicts mask *embeddings*; it never sees the codec. The criterion and the inference
path (``istr.model.inference``) decode them (docs/method.md#architecture: the model never sees the codec).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from istr.model.backbone import BackboneFPN
from istr.model.head import ISTRStage
from istr.model.pooler import POOLERS

# torchvision's ImageNet statistics, on 0-255 pixels.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class ISTR(nn.Module):
    """Backbone+FPN -> k queries -> N stages; returns the last stage's outputs plus ``aux`` stages."""

    def __init__(
        self,
        backbone: BackboneFPN,
        num_classes: int,
        code_dim: int,
        num_queries: int = 300,
        num_stages: int = 6,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dynamic_dim: int = 64,
        pooler_resolution: int = 7,
        pooler_sampling_ratio: int = 2,
        pooler: str = "roi_align",
        attention: str = "self+dynamic",
        head_layers: int = 3,
        dropout: float = 0.0,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        hidden_dim = backbone.out_channels
        self.backbone = backbone
        self.num_classes, self.code_dim, self.num_queries = num_classes, code_dim, num_queries
        if pooler not in POOLERS:
            raise ValueError(f"unknown pooler {pooler!r}; valid: {', '.join(POOLERS)}")
        self.pooler = POOLERS[pooler](pooler_resolution, pooler_sampling_ratio)
        # Query boxes start covering the whole image: normalised (cx, cy, w, h) = (.5, .5, 1, 1).
        self.query_boxes = nn.Embedding(num_queries, 4)
        nn.init.constant_(self.query_boxes.weight[:, :2], 0.5)
        nn.init.constant_(self.query_boxes.weight[:, 2:], 1.0)
        self.query_features = nn.Embedding(num_queries, hidden_dim)
        self.stages = nn.ModuleList(
            ISTRStage(
                num_classes,
                code_dim,
                hidden_dim,
                num_heads,
                ffn_dim,
                dynamic_dim,
                pooler_resolution,
                attention,
                head_layers,
                dropout,
                prior_prob,
            )
            for _ in range(num_stages)
        )
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def initial_boxes(self, image_sizes: Tensor) -> Tensor:
        """Learnable normalised cxcywh query boxes -> absolute x1y1x2y2 per image [B,k,4]."""
        cxcywh = self.query_boxes.weight
        xyxy = torch.cat([cxcywh[:, :2] - 0.5 * cxcywh[:, 2:], cxcywh[:, :2] + 0.5 * cxcywh[:, 2:]], dim=1)
        scale = image_sizes.flip(1).repeat(1, 2).to(xyxy.dtype)  # (w, h, w, h)
        return xyxy[None] * scale[:, None, :]

    def forward(self, images: Tensor, image_sizes: Tensor) -> dict:
        """images uint8/float [B,3,H,W] (0-255, padded), image_sizes [B,2] (h, w) -> docs/method.md outputs."""
        x = (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        features = self.backbone(x)
        boxes = self.initial_boxes(image_sizes)
        # Initial query features: the image feature (each FPN level's global average, summed) plus a
        # learnable embedding per query, as the authors' first release.
        image_feature = torch.stack([level.mean(dim=(2, 3)) for level in features.values()]).sum(0)
        queries = self.query_features.weight[None] + image_feature[:, None, :]
        pooler_input = self.pooler.prepare(features)
        outputs: list[dict] = []
        for stage in self.stages:
            # docs/method.md#architecture: boxes are detached BETWEEN stages; stage 0's loss trains the query boxes.
            stage_boxes = boxes.detach() if outputs else boxes
            rois = self.pooler(pooler_input, stage_boxes.detach().to(features["p2"].dtype))  # [B*k, S*S, d]
            out = stage(queries, rois, stage_boxes)
            queries, boxes = out.pop("queries"), out["boxes"]
            outputs.append(out)
        return {**outputs[-1], "aux": outputs[:-1]}


def build_model(model_cfg, num_classes: int, code_dim: int, backbone_weights: Path | None = None) -> ISTR:
    """Builder: the only place that reads ``cfg.model`` (docs/architecture.md#layers).

    ``backbone_weights`` is a local file resolved by the engine from ``model.pretrained``; None builds
    random weights (a checkpoint is loaded afterwards, or training starts from scratch).
    """
    backbone = BackboneFPN(
        model_cfg.backbone, model_cfg.hidden_dim, model_cfg.norm, backbone_weights, model_cfg.freeze_at
    )
    return ISTR(
        backbone,
        num_classes=num_classes,
        code_dim=code_dim,
        num_queries=model_cfg.num_queries,
        num_stages=model_cfg.num_stages,
        num_heads=model_cfg.num_heads,
        ffn_dim=model_cfg.ffn_dim,
        dynamic_dim=model_cfg.dynamic_dim,
        pooler_resolution=model_cfg.pooler_resolution,
        pooler_sampling_ratio=model_cfg.pooler_sampling_ratio,
        pooler=model_cfg.pooler,
        attention=model_cfg.attention,
        head_layers=model_cfg.head_layers,
        dropout=model_cfg.dropout,
        prior_prob=model_cfg.prior_prob,
    )
